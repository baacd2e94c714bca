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

/// One tensor ready to serialise: its HF name, shape and f32 values.
struct Named {
    name: String,
    shape: Vec<usize>,
    values: Vec<f32>,
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

    let tensors = named_tensors(model);
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|t| (t.name, t.shape, encode(&t.values, dtype)))
        .collect();
    let views = encoded.iter().map(|(name, shape, bytes)| {
        let view = safetensors::tensor::TensorView::new(dtype, shape.clone(), bytes)
            .expect("consistent tensor view");
        (name.clone(), view)
    });
    let metadata = Some(
        [("format".to_string(), "pt".to_string())]
            .into_iter()
            .collect(),
    );
    safetensors::serialize_to_file(views, metadata, &tmp.join("model.safetensors"))
        .with_context(|| format!("cannot write {}", tmp.join("model.safetensors").display()))?;

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

/// Every weight of `model` under its HF name, projections merged and back in `[out, in]`.
fn named_tensors(model: &Llama) -> Vec<Named> {
    let mut out = Vec::new();
    push(
        &mut out,
        "model.embed_tokens.weight",
        model.embed_tokens.weight.val(),
    );
    for (i, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        push(
            &mut out,
            &format!("{p}.input_layernorm.weight"),
            layer.input_layernorm.gamma.val(),
        );
        push(
            &mut out,
            &format!("{p}.post_attention_layernorm.weight"),
            layer.post_attention_layernorm.gamma.val(),
        );
        for (name, proj) in layer.projections() {
            push_projection(&mut out, &format!("{p}.{name}"), proj);
        }
    }
    push(&mut out, "model.norm.weight", model.norm.gamma.val());
    if let Some(head) = &model.lm_head {
        push(&mut out, "lm_head.weight", head.weight.val().transpose());
    }
    out
}

fn push_projection(out: &mut Vec<Named>, prefix: &str, proj: &LoraLinear) {
    let mut weight = proj.base.weight.val();
    if let Some(lora) = &proj.lora {
        weight = weight + lora.a.val().matmul(lora.b.val()).mul_scalar(lora.scale);
    }
    // burn keeps [in, out]; Hugging Face stores [out, in].
    push(out, &format!("{prefix}.weight"), weight.transpose());
    if let Some(bias) = &proj.base.bias {
        push(out, &format!("{prefix}.bias"), bias.val());
    }
}

fn push<const D: usize>(out: &mut Vec<Named>, name: &str, t: Tensor<D>) {
    let shape = t.dims().to_vec();
    let values = t
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 weights");
    out.push(Named {
        name: name.to_string(),
        shape,
        values,
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
