//! A LLaMA-family decoder read from a GGUF file: its `config.json` from the `{arch}.*`
//! metadata, and its tensors under their Hugging Face names and layout.
//!
//! llama.cpp's converter permutes the rows of `llama` q and k projections (interleaving each
//! head's two rotary halves); they are permuted back here, as transformers does. `qwen2` files
//! are not permuted.

use std::cell::RefCell;
use std::collections::HashSet;

use anyhow::{Context, Result, bail};
use serde_json::json;

use super::config::ModelConfig;
use super::load::Weights;
use super::names;
use crate::gguf::{GgmlType, GgufFile};
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

/// The decoder's architecture from a GGUF file's metadata.
pub fn model_config(file: &GgufFile) -> Result<ModelConfig> {
    ModelConfig::from_json(&config_json(file)?.to_string())
        .with_context(|| format!("{}", file.path().display()))
}

/// A GGUF file's tensors under Hugging Face names and layout, recording which were read.
pub struct GgufWeights<'a> {
    file: &'a GgufFile,
    /// `Some((q heads, kv heads))` where q and k rows are in llama.cpp's rotary order.
    permuted: Option<(usize, usize)>,
    read: RefCell<HashSet<String>>,
}

impl<'a> GgufWeights<'a> {
    /// The tensors of `file`, a decoder of `config`.
    pub fn new(file: &'a GgufFile, config: &ModelConfig) -> Self {
        let permuted = (config.model_type == "llama")
            .then_some((config.num_attention_heads, config.num_key_value_heads));
        Self {
            file,
            permuted,
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

    /// The heads whose rows tensor `hf` has permuted, if any.
    fn heads_of(&self, hf: &str) -> Option<usize> {
        let (q, kv) = self.permuted?;
        if hf.contains("self_attn.q_proj.") {
            Some(q)
        } else if hf.contains("self_attn.k_proj.") {
            Some(kv)
        } else {
            None
        }
    }
}

impl Weights for GgufWeights<'_> {
    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let info = self.record(name, shape)?;
        let values = self.file.read_f32(&info.name)?;
        Ok(match self.heads_of(name) {
            Some(heads) => unpermute_rows(&values, shape[0], heads),
            None => values,
        })
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
        Ok(Some(match self.heads_of(name) {
            Some(heads) => unpermute_rows(&blocks, shape[0], heads),
            None => blocks,
        }))
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
