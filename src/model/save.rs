//! Writing a model back as a Hugging Face directory: full fine-tuning's output, checkpoints of
//! full fine-tuning, and `ual merge`.
//!
//! Tensors are written under their Hugging Face names in HF's `[out, in]` layout, in the dtype
//! asked for, next to a copy of the source directory's config and tokenizer files.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::Tensor;
use safetensors::Dtype;

use super::llama::Llama;
use super::lora::LoraLinear;
use super::names;

/// Files copied unchanged from the source model directory, when present.
const COMPANION_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// A file output: never the model itself, never an existing file without `--force`.
pub fn check_file_output(model: &Path, out: &Path, force: bool) -> Result<()> {
    if out.is_dir() {
        bail!(
            "{}: is a directory; --format gguf writes one file",
            out.display()
        );
    }
    if model.canonicalize().ok() == out.canonicalize().ok() && out.exists() {
        bail!("{}: is the model itself; write elsewhere", out.display());
    }
    if out.exists() && !force {
        bail!("{}: exists; pass --force to replace it", out.display());
    }
    Ok(())
}

/// One tensor to write: its HF name, its shape, and how to compute its f32 values, so that
/// only one tensor's values exist at a time.
pub(super) struct Named<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Box<dyn Fn() -> Vec<f32> + 'a>,
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
/// The files are assembled in a temporary directory of this process's own, then moved into
/// `out`: a missing or empty `out` becomes that directory whole; an existing one gets each of
/// the files replaced and keeps any others. Nothing but the temporary directory is ever
/// deleted, and `out` may not be `source_dir` or lie inside it ([`check_output`]).
pub fn save_pretrained(model: &Llama, source_dir: &Path, out: &Path, dtype: Dtype) -> Result<()> {
    check_output(source_dir, out, true)?;
    let tmp = private_sibling(out)?;
    let result = write_directory(model, source_dir, &tmp, dtype).and_then(|()| install(&tmp, out));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Refuses an output that would write into the model directory `source_dir`, and, unless
/// `force`, one that exists and is not empty.
pub fn check_output(source_dir: &Path, out: &Path, force: bool) -> Result<()> {
    let resolved = |p: &Path| -> Option<PathBuf> {
        // `out` may not exist yet: resolve its nearest existing ancestor.
        let mut tail = Vec::new();
        let mut dir = p.to_path_buf();
        loop {
            if let Ok(found) = dir.canonicalize() {
                return Some(
                    tail.iter()
                        .rev()
                        .fold(found, |acc: PathBuf, part| acc.join(part)),
                );
            }
            tail.push(dir.file_name()?.to_owned());
            dir = dir.parent()?.to_path_buf();
            if dir.as_os_str().is_empty() {
                dir = PathBuf::from(".");
            }
        }
    };
    if let (Some(source), Some(target)) = (resolved(source_dir), resolved(out))
        && target.starts_with(&source)
    {
        bail!(
            "{}: is (inside) the model directory {}; write the merged model elsewhere",
            out.display(),
            source_dir.display()
        );
    }
    let non_empty = std::fs::read_dir(out).is_ok_and(|mut entries| entries.next().is_some());
    if non_empty && !force {
        bail!(
            "{}: exists and is not empty; pass --force to write the model's files into it (other files are kept)",
            out.display()
        );
    }
    Ok(())
}

/// A new, empty directory beside `out` that no one else uses: `.<name>.ual-<pid>-<n>`.
fn private_sibling(out: &Path) -> Result<PathBuf> {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = parent.join(format!(".{name}.ual-{}-{n}", std::process::id()));
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    Ok(tmp)
}

/// The model's files in `dir`: weights, `config.json` (in `dtype`) and the tokenizer's files.
fn write_directory(model: &Llama, source_dir: &Path, dir: &Path, dtype: Dtype) -> Result<()> {
    let weights = dir.join("model.safetensors");
    write_safetensors(&named_tensors(model), dtype, &weights)
        .with_context(|| format!("cannot write {}", weights.display()))?;
    let (mut config, companions) = source_files(source_dir)?;
    config["torch_dtype"] = torch_name(dtype).into();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    for (file, bytes) in companions {
        std::fs::write(dir.join(&file), bytes)
            .with_context(|| format!("cannot write {}", dir.join(&file).display()))?;
    }
    Ok(())
}

/// A model's `config.json`, and its other files as (name, bytes).
pub type SourceFiles = (serde_json::Value, Vec<(String, Vec<u8>)>);

/// The source model's `config.json` and its tokenizer and template files: copied from a
/// directory, or written from a GGUF file's metadata.
pub(crate) fn source_files(source: &Path) -> Result<SourceFiles> {
    if crate::gguf::is_gguf(source) {
        return super::gguf::hf_files(&crate::gguf::GgufFile::open(source)?);
    }
    let config_path = source.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let config = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", config_path.display()))?;
    let mut companions = Vec::new();
    for file in COMPANION_FILES {
        let from = source.join(file);
        if from.exists() {
            let bytes =
                std::fs::read(&from).with_context(|| format!("cannot read {}", from.display()))?;
            companions.push((file.to_string(), bytes));
        }
    }
    Ok((config, companions))
}

/// Moves the finished `tmp` to `out`: whole when `out` is missing or empty, else file by file.
fn install(tmp: &Path, out: &Path) -> Result<()> {
    let rename = |from: &Path, to: &Path| {
        std::fs::rename(from, to)
            .with_context(|| format!("cannot rename {} to {}", from.display(), to.display()))
    };
    // An empty directory holds nothing to lose; `remove_dir` refuses any other.
    if std::fs::remove_dir(out).is_ok() || !out.exists() {
        return rename(tmp, out);
    }
    for entry in std::fs::read_dir(tmp)? {
        let entry = entry?;
        rename(&entry.path(), &out.join(entry.file_name()))?;
    }
    std::fs::remove_dir(tmp).with_context(|| format!("cannot remove {}", tmp.display()))
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
pub(super) fn named_tensors(model: &Llama) -> Vec<Named<'_>> {
    let mut out = Vec::new();
    let embedding = &model.embed_tokens.weight;
    push(
        &mut out,
        &format!("{}.weight", names::EMBED),
        embedding.dims().to_vec(),
        move || embedding.val(),
    );
    for (i, layer) in model.layers.iter().enumerate() {
        let p = names::layer(i);
        for (name, norm) in [
            (names::INPUT_NORM, &layer.input_layernorm),
            (names::POST_ATTENTION_NORM, &layer.post_attention_layernorm),
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
        &format!("{}.weight", names::NORM),
        norm.dims().to_vec(),
        move || norm.val(),
    );
    if let Some(head) = &model.lm_head {
        let [d_in, d_out] = head.weight.dims();
        push(
            &mut out,
            &format!("{}.weight", names::HEAD),
            vec![d_out, d_in],
            move || head.weight.val().transpose(),
        );
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
            let mut weight = proj.dense_weight();
            if let Some(lora) = &proj.lora {
                weight = weight + lora.a.val().matmul(lora.b.val()).mul_scalar(lora.scale);
            }
            weight.transpose()
        },
    );
    if let Some(bias) = &proj.bias {
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
