//! Writing a model back as a Hugging Face directory: full fine-tuning's output, checkpoints of
//! full fine-tuning, and `ual merge`.
//!
//! Tensors are written under their Hugging Face names in HF's `[out, in]` layout, in the dtype
//! asked for, next to a copy of the source directory's config and tokenizer files.

use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::tensor::Tensor;
use safetensors::Dtype;

use super::llama::Llama;
use super::projection::LoraLinear;

/// Files copied unchanged from the source model directory, when present.
const COMPANION_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// One tensor to write: its HF name, its shape, and how to compute its f32 values, so that
/// only one tensor's values exist at a time.
struct Named<'a> {
    name: String,
    shape: Vec<usize>,
    values: Box<dyn Fn() -> Vec<f32> + 'a>,
}

/// Parses a `torch_dtype` string (`float32`, `float16`, `bfloat16`); `None` means float32.
pub fn dtype_from_torch(name: Option<&str>) -> Result<Dtype> {
    Ok(match name.unwrap_or("float32") {
        "float32" | "float" => Dtype::F32,
        "float16" | "half" => Dtype::F16,
        "bfloat16" => Dtype::BF16,
        other => bail!("cannot write dtype {other:?}; choose float32, float16 or bfloat16"),
    })
}

fn torch_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F16 => "float16",
        Dtype::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// Writes `model` into `out` as a Hugging Face directory that `transformers` loads, with LoRA
/// adapters (if any) folded into their base weights: W' = W + (α/r)·A·B.
///
/// The directory is assembled under a temporary name and renamed into place, so `out` is either
/// absent or complete.
pub fn save_pretrained(model: &Llama, source_dir: &Path, out: &Path, dtype: Dtype) -> Result<()> {
    let tmp = out.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;

    let weights = tmp.join("model.safetensors");
    write_safetensors(&named_tensors(model), dtype, &weights)
        .with_context(|| format!("cannot write {}", weights.display()))?;

    let config_path = source_dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let mut config: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", config_path.display()))?;
    config["torch_dtype"] = torch_name(dtype).into();
    std::fs::write(
        tmp.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    for file in COMPANION_FILES {
        let from = source_dir.join(file);
        if from.exists() {
            std::fs::copy(&from, tmp.join(file))
                .with_context(|| format!("cannot copy {}", from.display()))?;
        }
    }
    if out.exists() {
        std::fs::remove_dir_all(out)
            .with_context(|| format!("cannot replace {}", out.display()))?;
    }
    std::fs::rename(&tmp, out)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), out.display()))
}

/// Writes `tensors` as one safetensors file in `dtype`, a tensor at a time: the header first
/// (every offset follows from the shapes), then each tensor's bytes as they are computed.
fn write_safetensors(tensors: &[Named], dtype: Dtype, path: &Path) -> Result<()> {
    use std::io::Write;
    let width = match dtype {
        Dtype::F16 | Dtype::BF16 => 2,
        _ => 4,
    };
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0usize;
    for t in tensors {
        let end = offset + t.shape.iter().product::<usize>() * width;
        let entry = serde_json::json!({ "dtype": format!("{dtype:?}"), "shape": t.shape, "data_offsets": [offset, end] });
        header.insert(t.name.clone(), entry);
        offset = end;
    }
    let mut text = serde_json::to_string(&header)?;
    // The data starts on an 8-byte boundary; the format pads the header with spaces.
    text.push_str(&" ".repeat((8 - text.len() % 8) % 8));
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    file.write_all(&(text.len() as u64).to_le_bytes())?;
    file.write_all(text.as_bytes())?;
    for t in tensors {
        file.write_all(&encode(&(t.values)(), dtype))?;
    }
    file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

/// Every weight of `model` under its HF name, projections merged and back in `[out, in]`.
fn named_tensors(model: &Llama) -> Vec<Named<'_>> {
    let mut out = Vec::new();
    let embedding = &model.embed_tokens.weight;
    push(
        &mut out,
        "model.embed_tokens.weight",
        embedding.dims().to_vec(),
        move || embedding.val(),
    );
    for (i, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        for (name, norm) in [
            ("input_layernorm", &layer.input_layernorm),
            ("post_attention_layernorm", &layer.post_attention_layernorm),
        ] {
            push(
                &mut out,
                &format!("{p}.{name}.weight"),
                norm.gamma.dims().to_vec(),
                move || norm.gamma.val(),
            );
        }
        for (name, proj) in layer.projections() {
            push_projection(&mut out, &format!("{p}.{name}"), proj);
        }
    }
    let norm = &model.norm.gamma;
    push(
        &mut out,
        "model.norm.weight",
        norm.dims().to_vec(),
        move || norm.val(),
    );
    if let Some(head) = &model.lm_head {
        let [d_in, d_out] = head.weight.dims();
        push(&mut out, "lm_head.weight", vec![d_out, d_in], move || {
            head.weight.val().transpose()
        });
    }
    out
}

fn push_projection<'a>(out: &mut Vec<Named<'a>>, prefix: &str, proj: &'a LoraLinear) {
    let [d_in, d_out] = proj.dims();
    // burn keeps [in, out]; Hugging Face stores [out, in].
    push(
        out,
        &format!("{prefix}.weight"),
        vec![d_out, d_in],
        move || {
            let mut weight = proj.base.weight.val().cast(burn::tensor::DType::F32);
            if let Some(lora) = &proj.lora {
                weight = weight + lora.a.val().matmul(lora.b.val()).mul_scalar(lora.scale);
            }
            weight.transpose()
        },
    );
    if let Some(bias) = &proj.base.bias {
        push(out, &format!("{prefix}.bias"), vec![d_out], move || {
            bias.val()
        });
    }
}

/// Adds `name` of `shape`, whose values `tensor` computes when the file is written.
fn push<'a, const D: usize>(
    out: &mut Vec<Named<'a>>,
    name: &str,
    shape: Vec<usize>,
    tensor: impl Fn() -> Tensor<D> + 'a,
) {
    let values = move || {
        tensor()
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32 weights")
    };
    out.push(Named {
        name: name.to_string(),
        shape,
        values: Box::new(values),
    });
}

fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}
