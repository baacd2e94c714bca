//! A LLaMA-family decoder read from a GGUF file: its `config.json` from the `{arch}.*`
//! metadata, and its tensors under their Hugging Face names and layout.
//!
//! llama.cpp's converter permutes the rows of `llama` q and k projections (interleaving each
//! head's two rotary halves); they are permuted back here, as transformers does. `qwen2` files
//! are not permuted.

use std::cell::RefCell;
use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::json;

use super::config::ModelConfig;
use super::load::Weights;
use super::names;
use crate::gguf::write::Meta;
use crate::gguf::{GgmlType, GgufFile, GgufWriter};
use crate::ops::quant::blocks::{Block, BlockFormat};

/// The architectures whose GGUF files ual reads, with transformers' class for each.
pub const ARCHITECTURES: [(&str, &str); 2] =
    [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")];

pub use crate::gguf::is_gguf;

/// The `config.json` equivalent of a GGUF file's metadata.
pub fn config_json(file: &GgufFile) -> Result<serde_json::Value> {
    let arch = file.str("general.architecture")?;
    let Some((_, class)) = ARCHITECTURES.iter().find(|(a, _)| *a == arch) else {
        bail!(
            "{}: `general.architecture` is {arch:?}; ual reads llama (Llama, Mistral, SmolLM) and qwen2",
            file.path().display()
        );
    };
    let key = |k: &str| format!("{arch}.{k}");
    if let Some(kind) = file.get(&key("rope.scaling.type")).and_then(|v| v.as_str())
        && kind != "none"
    {
        bail!(
            "{}: RoPE scaling `{kind}` (`{}`) is not supported in GGUF files",
            file.path().display(),
            key("rope.scaling.type")
        );
    }
    if file.tensor("rope_freqs.weight").is_some() {
        bail!(
            "{}: tensor `rope_freqs.weight` (Llama 3.1 RoPE scaling) is not supported in GGUF files; use the Hugging Face directory",
            file.path().display()
        );
    }
    let heads = file.u64(&key("attention.head_count"))?;
    let hidden = file.u64(&key("embedding_length"))?;
    let embed = file.tensor("token_embd.weight").with_context(|| {
        format!(
            "{}: tensor `token_embd.weight` is missing",
            file.path().display()
        )
    })?;
    let optional = |k: &str| file.get(&key(k)).and_then(|v| v.as_u64());
    let token = |k: &str| file.get(k).and_then(|v| v.as_u64());
    Ok(json!({
        "model_type": arch,
        "architectures": [class],
        "vocab_size": embed.dims.get(1).copied().unwrap_or(0),
        "hidden_size": hidden,
        "intermediate_size": file.u64(&key("feed_forward_length"))?,
        "num_hidden_layers": file.u64(&key("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": optional("attention.head_count_kv").unwrap_or(heads),
        "head_dim": optional("attention.key_length").unwrap_or(hidden / heads.max(1)),
        "rms_norm_eps": file.f64(&key("attention.layer_norm_rms_epsilon"))?,
        "rope_theta": file.get(&key("rope.freq_base")).and_then(|v| v.as_f64()).unwrap_or(10_000.0),
        "max_position_embeddings": optional("context_length").unwrap_or(2048),
        "tie_word_embeddings": file.tensor("output.weight").is_none(),
        "attention_bias": file.tensor("blk.0.attn_q.bias").is_some(),
        "hidden_act": "silu",
        "bos_token_id": token("tokenizer.ggml.bos_token_id"),
        "eos_token_id": token("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }))
}

/// The Hugging Face files a GGUF file's metadata stands for: `config.json`, and
/// `tokenizer.json` and `tokenizer_config.json` (with the chat template), as (name, bytes).
pub fn hf_files(file: &GgufFile) -> Result<super::save::SourceFiles> {
    let config = config_json(file)?;
    let tokenizer = crate::gguf::tokenizer::tokenizer_json(file)?;
    let token = |key: &str| file.token_text(key);
    let mut tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
    });
    if let Some(template) = file.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
        tokenizer_config["chat_template"] = json!(template);
    }
    Ok((
        config,
        vec![
            ("tokenizer.json".into(), serde_json::to_vec(&tokenizer)?),
            (
                "tokenizer_config.json".into(),
                serde_json::to_vec_pretty(&tokenizer_config)?,
            ),
        ],
    ))
}

/// The decoder's architecture from a GGUF file's metadata.
pub fn model_config(file: &GgufFile) -> Result<ModelConfig> {
    ModelConfig::from_json(&config_json(file)?.to_string())
        .with_context(|| format!("{}", file.path().display()))
}

/// A GGUF file's tensors under Hugging Face names and layout, recording which were read.
pub struct GgufWeights<'a> {
    file: &'a GgufFile,
    config: ModelConfig,
    read: RefCell<HashSet<String>>,
}

impl<'a> GgufWeights<'a> {
    /// The tensors of `file`, a decoder of `config`.
    pub fn new(file: &'a GgufFile, config: &ModelConfig) -> Self {
        Self {
            file,
            config: config.clone(),
            read: Default::default(),
        }
    }

    /// Fails naming the first tensor of the file that the model did not read.
    pub fn check_all_used(&self) -> Result<()> {
        let read = self.read.borrow();
        let stray: Vec<&str> = self
            .file
            .tensors()
            .iter()
            .map(|t| t.name.as_str())
            .filter(|n| !read.contains(*n))
            .collect();
        if let Some(first) = stray.first() {
            bail!(
                "{}: tensor `{first}` (and {} more) is not part of the decoder its metadata describes",
                self.file.path().display(),
                stray.len() - 1
            );
        }
        Ok(())
    }

    /// The GGUF record of Hugging Face tensor `hf`, checked against `shape`.
    fn record(&self, hf: &str, shape: &[usize]) -> Result<&crate::gguf::TensorInfo> {
        let path = self.file.path().display();
        let name = names::to_gguf(hf)
            .with_context(|| format!("{path}: no GGUF name for tensor `{hf}`"))?;
        let info = self
            .file
            .tensor(&name)
            .with_context(|| format!("{path}: tensor `{name}` ({hf}) is missing"))?;
        if info.shape() != shape {
            bail!(
                "{path}: tensor `{name}` has shape {:?}, expected {shape:?}",
                info.shape()
            );
        }
        self.read.borrow_mut().insert(name);
        Ok(info)
    }
}

impl Weights for GgufWeights<'_> {
    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let info = self.record(name, shape)?;
        let values = self.file.read_f32(&info.name)?;
        Ok(match permuted_heads(&self.config, name) {
            Some(heads) => unpermute_rows(&values, shape[0], heads),
            None => values,
        })
    }

    fn half_type(&self, name: &str) -> Option<burn::tensor::DType> {
        let info = self.file.tensor(&names::to_gguf(name)?)?;
        match info.ggml_type {
            GgmlType::F16 => Some(burn::tensor::DType::F16),
            GgmlType::BF16 => Some(burn::tensor::DType::BF16),
            _ => None,
        }
    }

    fn blocks(
        &self,
        name: &str,
        shape: &[usize],
        format: BlockFormat,
    ) -> Result<Option<Vec<Block>>> {
        let info = self.record(name, shape)?;
        let stored = match format {
            BlockFormat::Q8_0 => GgmlType::Q8_0,
            BlockFormat::Q4_0 => GgmlType::Q4_0,
        };
        if info.ggml_type != stored {
            return Ok(None);
        }
        let raw = self.file.raw(info);
        let blocks: Vec<Block> = raw
            .chunks_exact(format.block_bytes())
            .map(|b| Block::from_bytes(format, b))
            .collect();
        Ok(Some(match permuted_heads(&self.config, name) {
            Some(heads) => unpermute_rows(&blocks, shape[0], heads),
            None => blocks,
        }))
    }
}

/// The GGUF architecture a decoder is written as: Llama, Mistral and SmolLM are all `llama`.
fn gguf_arch(c: &ModelConfig) -> &'static str {
    if c.model_type == "qwen2" {
        "qwen2"
    } else {
        "llama"
    }
}

/// The heads whose rows of Hugging Face tensor `hf` llama.cpp stores permuted (the q and k
/// projections of `llama` files), if any: the one rule reading, merging and exporting share.
fn permuted_heads(c: &ModelConfig, hf: &str) -> Option<usize> {
    if gguf_arch(c) != "llama" {
        None
    } else if hf.contains("self_attn.q_proj.") {
        Some(c.num_attention_heads)
    } else if hf.contains("self_attn.k_proj.") {
        Some(c.num_key_value_heads)
    } else {
        None
    }
}

/// Undoes llama.cpp's `permute` of a q or k projection's `rows` (out features), in any unit
/// that rows are made of (values or blocks): llama.cpp stores head h's row `2i + half` where
/// Hugging Face has `half·(d/2) + i`.
pub fn unpermute_rows<T: Copy>(values: &[T], rows: usize, heads: usize) -> Vec<T> {
    reorder_rows(values, rows, heads, |h, half, i, d| {
        (h * d + 2 * i + half, h * d + half * d / 2 + i)
    })
}

/// llama.cpp's `permute`, for writing GGUF: the inverse of [`unpermute_rows`].
pub fn permute_rows<T: Copy>(values: &[T], rows: usize, heads: usize) -> Vec<T> {
    reorder_rows(values, rows, heads, |h, half, i, d| {
        (h * d + half * d / 2 + i, h * d + 2 * i + half)
    })
}

/// Moves row `from` to row `to` for each (head, half, i) that `map` turns into `(from, to)`.
fn reorder_rows<T: Copy>(
    values: &[T],
    rows: usize,
    heads: usize,
    map: impl Fn(usize, usize, usize, usize) -> (usize, usize),
) -> Vec<T> {
    let width = values.len() / rows;
    let d = rows / heads;
    let mut out = values.to_vec();
    for h in 0..heads {
        for half in 0..2 {
            for i in 0..d / 2 {
                let (from, to) = map(h, half, i, d);
                out[to * width..(to + 1) * width]
                    .copy_from_slice(&values[from * width..(from + 1) * width]);
            }
        }
    }
    out
}

/// The types a model is written to GGUF in: norms stay f32, as llama.cpp's converter keeps
/// them, and a matrix whose rows are not whole 32-value blocks falls back to f16.
pub const WRITE_TYPES: [GgmlType; 3] = [GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_0];

/// Writes `model` (adapters merged) as a GGUF file llama.cpp and Ollama load: the decoder's
/// metadata, the tokenizer and chat template of `source` (a GGUF file or a Hugging Face
/// directory), and every tensor in `ggml_type`.
pub fn write_model(
    model: &super::Llama,
    source: &Path,
    out: &Path,
    ggml_type: GgmlType,
) -> Result<()> {
    if !WRITE_TYPES.contains(&ggml_type) {
        bail!(
            "GGUF models are written as f16, q8_0 or q4_0, not {}",
            ggml_type.name()
        );
    }
    let config = &model.config;
    if let Some(window) = config.sliding_window {
        // llama.cpp's `llama` architecture has no sliding window (as its converter, which
        // writes Mistral as `llama`, drops it).
        eprintln!(
            "note: the {window}-token sliding window is not written: llama.cpp attends to every earlier position, which differs only past {window} tokens"
        );
    }
    let mut writer = GgufWriter::new();
    decoder_metadata(&mut writer, config, ggml_type)?;
    tokenizer_metadata(&mut writer, source)?;
    for tensor in super::save::named_tensors(model) {
        let name = names::to_gguf(&tensor.name)
            .with_context(|| format!("no GGUF name for tensor `{}`", tensor.name))?;
        let shape = tensor.shape.clone();
        let cols = *shape.last().expect("a tensor has a shape");
        let stored = match ggml_type {
            _ if shape.len() == 1 => GgmlType::F32,
            GgmlType::F16 => GgmlType::F16,
            quantized if cols.is_multiple_of(quantized.block_size()) => quantized,
            _ => GgmlType::F16,
        };
        let heads = permuted_heads(config, &tensor.name);
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        writer.tensor(&name, dims, stored, move || {
            let values = (tensor.values)();
            let values = match heads {
                Some(heads) => permute_rows(&values, shape[0], heads),
                None => values,
            };
            encode(stored, &values, cols)
        });
    }
    writer.write(out)
}

/// `values` (rows of `cols`) in `ggml_type`'s bytes.
fn encode(ggml_type: GgmlType, values: &[f32], cols: usize) -> Result<Vec<u8>> {
    use crate::ops::quant::blocks;
    Ok(match ggml_type {
        GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        GgmlType::Q8_0 | GgmlType::Q4_0 => {
            let format = match ggml_type {
                GgmlType::Q8_0 => BlockFormat::Q8_0,
                _ => BlockFormat::Q4_0,
            };
            blocks::to_bytes(format, &blocks::quantize_rows(format, values, cols))
        }
        other => bail!("cannot encode {}", other.name()),
    })
}

/// `general.*` and `{arch}.*`, with the exact types llama.cpp's loader reads them as.
fn decoder_metadata(w: &mut GgufWriter, c: &ModelConfig, ggml_type: GgmlType) -> Result<()> {
    if c.rope_scaling.is_some() {
        bail!("writing Llama 3 RoPE scaling (`rope_scaling`) to GGUF is not supported");
    }
    let arch = gguf_arch(c);
    let u32_of = |v: usize| Meta::U32(v as u32);
    let file_type = match ggml_type {
        GgmlType::Q8_0 => 7,
        GgmlType::Q4_0 => 2,
        _ => 1,
    };
    w.meta("general.architecture", Meta::Str(arch.into()))
        .meta("general.type", Meta::Str("model".into()))
        .meta("general.name", Meta::Str("ual merged model".into()))
        .meta("general.file_type", Meta::U32(file_type))
        .meta("general.quantization_version", Meta::U32(2));
    let key = |k: &str| format!("{arch}.{k}");
    w.meta(&key("vocab_size"), u32_of(c.vocab_size))
        .meta(&key("context_length"), u32_of(c.max_position_embeddings))
        .meta(&key("embedding_length"), u32_of(c.hidden_size))
        .meta(&key("feed_forward_length"), u32_of(c.intermediate_size))
        .meta(&key("block_count"), u32_of(c.num_hidden_layers))
        .meta(&key("attention.head_count"), u32_of(c.num_attention_heads))
        .meta(
            &key("attention.head_count_kv"),
            u32_of(c.num_key_value_heads),
        )
        .meta(&key("attention.key_length"), u32_of(c.head_dim))
        .meta(&key("attention.value_length"), u32_of(c.head_dim))
        .meta(&key("rope.dimension_count"), u32_of(c.head_dim))
        .meta(&key("rope.freq_base"), Meta::F32(c.rope_theta as f32))
        .meta(
            &key("attention.layer_norm_rms_epsilon"),
            Meta::F32(c.rms_norm_eps as f32),
        );
    Ok(())
}

/// `tokenizer.*`: copied from a GGUF source, or converted from a directory's tokenizer.
fn tokenizer_metadata(w: &mut GgufWriter, source: &Path) -> Result<()> {
    if crate::gguf::is_gguf(source) {
        let file = GgufFile::open(source)?;
        for (key, value) in file.metadata() {
            if key.starts_with("tokenizer.") {
                w.meta(key, retyped(value));
            }
        }
        return Ok(());
    }
    super::gguf_vocab::from_directory(w, source)
}

/// A value read from GGUF, in the type llama.cpp reads that key as: 32-bit numbers, arrays
/// of i32 (token types) or f32 (scores).
fn retyped(value: &crate::gguf::Value) -> Meta {
    use crate::gguf::Value;
    match value {
        Value::U64(v) => Meta::U32(*v as u32),
        Value::I64(v) => Meta::I32(*v as i32),
        Value::F64(v) => Meta::F32(*v as f32),
        Value::Bool(b) => Meta::Bool(*b),
        Value::Str(s) => Meta::Str(s.clone()),
        Value::Array(items) => match items.first() {
            Some(Value::F64(_)) => Meta::F32s(
                items
                    .iter()
                    .map(|v| v.as_f64().unwrap_or(0.0) as f32)
                    .collect(),
            ),
            Some(Value::U64(_) | Value::I64(_)) => Meta::I32s(
                items
                    .iter()
                    .map(|v| match v {
                        Value::I64(i) => *i as i32,
                        Value::U64(u) => *u as i32,
                        _ => 0,
                    })
                    .collect(),
            ),
            _ => Meta::Strs(
                items
                    .iter()
                    .map(|v| v.as_str().unwrap_or_default().to_string())
                    .collect(),
            ),
        },
    }
}

/// Writes the LoRA adapter applied to `model` as llama.cpp's LoRA GGUF (`general.type =
/// adapter`): `blk.N.attn_q.weight.lora_a` holds PEFT's `lora_A` (`[r, in]`) and `.lora_b` its
/// `lora_B` (`[out, r]`, rows permuted as the base's q and k are), with `adapter.lora.alpha`.
pub fn write_adapter(model: &super::Llama, out: &Path) -> Result<()> {
    let c = &model.config;
    let arch = gguf_arch(c);
    let mut writer = GgufWriter::new();
    writer
        .meta("general.architecture", Meta::Str(arch.into()))
        .meta("general.type", Meta::Str("adapter".into()))
        .meta("general.name", Meta::Str("ual LoRA adapter".into()))
        .meta("adapter.type", Meta::Str("lora".into()));
    let mut alpha = None;
    for (name, proj) in model.projections() {
        let Some(lora) = &proj.lora else { continue };
        let [d_in, r] = lora.a.dims();
        let [_, d_out] = lora.b.dims();
        alpha.get_or_insert(lora.scale * r as f64);
        let gguf = names::to_gguf(&format!("{name}.weight"))
            .with_context(|| format!("no GGUF name for `{name}`"))?;
        let heads = permuted_heads(c, &format!("{name}.weight"));
        let host = |t: burn::tensor::Tensor<2>| -> Vec<f32> {
            t.into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .expect("f32 factors")
        };
        // burn's [in, r]·[r, out]; PEFT's lora_A is [r, in] and lora_B [out, r].
        let a = host(lora.a.val().transpose());
        let b = host(lora.b.val().transpose());
        let b = match heads {
            Some(heads) => permute_rows(&b, d_out, heads),
            None => b,
        };
        writer.tensor(
            &format!("{gguf}.lora_a"),
            vec![d_in as u64, r as u64],
            GgmlType::F32,
            move || encode(GgmlType::F32, &a, d_in),
        );
        writer.tensor(
            &format!("{gguf}.lora_b"),
            vec![r as u64, d_out as u64],
            GgmlType::F32,
            move || encode(GgmlType::F32, &b, r),
        );
    }
    let Some(alpha) = alpha else {
        bail!("the model carries no LoRA adapter to export");
    };
    writer.meta("adapter.lora.alpha", Meta::F32(alpha as f32));
    writer.write(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_llama_cpp_s() {
        // llama.cpp: w.reshape(heads, 2, d/2, width).swapaxes(1, 2): HF row half·d/2 + i goes
        // to 2i + half. Two heads of width-1 rows 0..8.
        let hf: Vec<u32> = (0..8).collect();
        let gguf = permute_rows(&hf, 8, 2);
        assert_eq!(gguf, [0, 2, 1, 3, 4, 6, 5, 7]);
        assert_eq!(unpermute_rows(&gguf, 8, 2), hf);
    }
}
