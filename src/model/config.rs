//! The Hugging Face `config.json` of a LLaMA-family checkpoint.
//!
//! Llama, Mistral and Qwen2 share one decoder; they differ only in the fields read here
//! (GQA head counts, RoPE base and scaling, the sliding window, and Qwen2's q/k/v bias).

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// The `model_type` values whose decoder ual implements.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2"];

/// The `architectures` classes whose network ual implements: a causal LM head on the decoder.
pub const SUPPORTED_ARCHITECTURES: &[&str] =
    &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

/// Llama-3 style frequency-dependent RoPE scaling (`rope_scaling.rope_type = "llama3"`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Llama3RopeScaling {
    /// How much the long wavelengths are stretched.
    pub factor: f64,
    /// Wavelengths above `original / low_freq_factor` are fully scaled.
    pub low_freq_factor: f64,
    /// Wavelengths below `original / high_freq_factor` are kept.
    pub high_freq_factor: f64,
    /// The context length the model was pre-trained with.
    pub original_max_position_embeddings: usize,
}

/// The architecture of a decoder, resolved from `config.json` with transformers' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `llama`, `mistral` or `qwen2`.
    pub model_type: String,
    /// Vocabulary size V.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// SwiGLU width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm's ε.
    pub rms_norm_eps: f64,
    /// RoPE's base.
    pub rope_theta: f64,
    /// Llama 3's RoPE scaling, if any.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Whether the head is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Qwen2 puts a bias on the q, k and v projections.
    pub attention_bias: bool,
    /// Mistral's sliding-window attention: a token sees at most this many positions, itself included.
    pub sliding_window: Option<usize>,
    /// Positions the model was trained for.
    pub max_position_embeddings: usize,
    /// The beginning-of-sequence id.
    pub bos_token_id: Option<u32>,
    /// Every id that ends a generation.
    pub eos_token_ids: Vec<u32>,
    /// The dtype the checkpoint was saved in (`torch_dtype`), kept so merges can write it back.
    pub torch_dtype: Option<String>,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers >= 5 folds `rope_theta` and `rope_scaling` into this one object.
    rope_parameters: Option<serde_json::Value>,
    mlp_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_position_embeddings: Option<usize>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<serde_json::Value>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    hidden_act: Option<String>,
}

impl ModelConfig {
    /// The EOS id that ends a response; training and scoring need one.
    pub fn eos_token_id(&self) -> anyhow::Result<u32> {
        self.eos_token_ids
            .first()
            .copied()
            .ok_or_else(|| anyhow::anyhow!("config.json: field `eos_token_id` is required"))
    }

    /// Reads and validates `config.json`; every error names the file and the field.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("{}", path.display()))
    }

    /// Parses a `config.json`; errors name the field.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).context("invalid JSON")?;
        let model_type = supported_model_type(&raw)?;
        let require = |v: Option<usize>, name: &str| -> Result<usize> {
            match v {
                Some(0) => bail!("field `{name}` must be positive"),
                Some(v) => Ok(v),
                None => bail!("missing field `{name}`"),
            }
        };
        let hidden_size = require(raw.hidden_size, "hidden_size")?;
        let num_attention_heads = require(raw.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            bail!(
                "field `num_key_value_heads`: {num_key_value_heads} does not divide num_attention_heads = {num_attention_heads}"
            );
        }
        let head_dim = raw.head_dim.unwrap_or(hidden_size / num_attention_heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            bail!("field `head_dim`: {head_dim} must be even and positive for rotary embeddings");
        }
        // The MLP is SwiGLU: any other activation would be computed as SiLU, silently.
        if let Some(act) = raw.hidden_act.as_deref().filter(|a| *a != "silu") {
            bail!("field `hidden_act`: {act:?} is not implemented; ual's MLP is SwiGLU (\"silu\")");
        }
        let positive = |v: Option<f64>, name: &str| -> Result<Option<f64>> {
            match v {
                Some(x) if !(x.is_finite() && x > 0.0) => {
                    bail!("field `{name}`: {x} must be a positive number")
                }
                other => Ok(other),
            }
        };
        let rms_norm_eps = positive(raw.rms_norm_eps, "rms_norm_eps")?;
        let rope_theta = positive(
            raw.rope_theta
                .or_else(|| raw.rope_parameters.as_ref()?.get("rope_theta")?.as_f64()),
            "rope_theta",
        )?;
        if raw.mlp_bias == Some(true) {
            bail!("field `mlp_bias`: MLP biases are not supported");
        }
        let is_qwen2 = model_type == "qwen2";
        let sliding_window = sliding_window(&model_type, &raw)?;
        Ok(Self {
            vocab_size: require(raw.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: require(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers: require(raw.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: rms_norm_eps.unwrap_or(1e-6),
            rope_theta: rope_theta.unwrap_or(10_000.0),
            rope_scaling: parse_rope_scaling(raw.rope_scaling.or(raw.rope_parameters))?,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: is_qwen2 || raw.attention_bias.unwrap_or(false),
            sliding_window,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            bos_token_id: raw.bos_token_id,
            eos_token_ids: parse_eos(raw.eos_token_id)?,
            torch_dtype: raw.torch_dtype.or(raw.dtype),
            model_type,
        })
    }

    /// How many query heads share one key/value head.
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

/// `model_type`, checked with `architectures` against the networks ual implements.
fn supported_model_type(raw: &RawConfig) -> Result<String> {
    let model_type = raw
        .model_type
        .clone()
        .context("missing field `model_type`")?;
    if !SUPPORTED_MODEL_TYPES.contains(&model_type.as_str()) {
        bail!(
            "field `model_type`: unsupported model type {model_type:?}; supported: {}",
            SUPPORTED_MODEL_TYPES.join(", ")
        );
    }
    if let Some(other) = raw
        .architectures
        .iter()
        .flatten()
        .find(|a| !SUPPORTED_ARCHITECTURES.contains(&a.as_str()))
    {
        bail!(
            "field `architectures`: {other:?} is not a network ual implements; supported: {}",
            SUPPORTED_ARCHITECTURES.join(", ")
        );
    }
    Ok(model_type)
}

/// The attention window, if any. Qwen2 declares one but only uses it when
/// `use_sliding_window` is set.
fn sliding_window(model_type: &str, raw: &RawConfig) -> Result<Option<usize>> {
    let window = match (model_type, raw.use_sliding_window) {
        ("qwen2", Some(true)) => raw.sliding_window,
        ("qwen2", _) => None,
        _ => raw.sliding_window,
    };
    if window == Some(0) {
        bail!("field `sliding_window` must be positive");
    }
    Ok(window)
}

fn parse_rope_scaling(value: Option<serde_json::Value>) -> Result<Option<Llama3RopeScaling>> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let kind = value
        .get("rope_type")
        .or_else(|| value.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("");
    match kind {
        "default" => Ok(None),
        "llama3" => serde_json::from_value(value)
            .map(Some)
            .context("field `rope_scaling`: invalid llama3 parameters"),
        other => bail!("field `rope_scaling`: unsupported rope_type {other:?}; supported: llama3"),
    }
}

fn parse_eos(value: Option<serde_json::Value>) -> Result<Vec<u32>> {
    let as_id = |v: &serde_json::Value| {
        v.as_u64()
            .map(|id| id as u32)
            .context("field `eos_token_id` must hold token ids")
    };
    match value {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(ids)) => ids.iter().map(as_id).collect(),
        Some(v) => Ok(vec![as_id(&v)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA: &str = r#"{"model_type":"llama","vocab_size":100,"hidden_size":16,
        "intermediate_size":32,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2}"#;

    #[test]
    fn defaults_follow_transformers() {
        let c = ModelConfig::from_json(LLAMA).unwrap();
        assert_eq!((c.head_dim, c.group_size()), (4, 2));
        assert_eq!(c.rope_theta, 10_000.0);
        assert!(!c.tie_word_embeddings && !c.attention_bias);
    }

    #[test]
    fn reads_transformers_5_rope_parameters() {
        let json = LLAMA.replace(
            "}",
            r#","rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,
                "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#,
        );
        let c = ModelConfig::from_json(&json).unwrap();
        assert_eq!(c.rope_theta, 500_000.0);
        assert_eq!(
            c.rope_scaling.unwrap().original_max_position_embeddings,
            8192
        );
    }

    #[test]
    fn unknown_model_type_lists_supported() {
        let err = ModelConfig::from_json(&LLAMA.replace("llama", "gpt2")).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("gpt2") && msg.contains("llama, mistral, qwen2"),
            "{msg}"
        );
    }

    #[test]
    fn an_empty_sliding_window_is_refused() {
        // A window of 0 would leave every position with nothing to attend to.
        let json = LLAMA.replace("}", r#","sliding_window":0}"#);
        let err = ModelConfig::from_json(&json).unwrap_err();
        assert!(format!("{err:#}").contains("sliding_window"), "{err:#}");
        let json = LLAMA.replace("}", r#","sliding_window":4096}"#);
        assert_eq!(
            ModelConfig::from_json(&json).unwrap().sliding_window,
            Some(4096)
        );
    }

    #[test]
    fn missing_field_is_named() {
        let err = ModelConfig::from_json(&LLAMA.replace(r#""hidden_size":16,"#, "")).unwrap_err();
        assert!(format!("{err:#}").contains("hidden_size"));
    }

    #[test]
    fn an_unsupported_architecture_is_refused_by_name() {
        let gpt2 = LLAMA.replacen('{', r#"{"architectures":["GPT2LMHeadModel"],"#, 1);
        let err = format!("{:#}", ModelConfig::from_json(&gpt2).unwrap_err());
        assert!(
            err.contains("architectures") && err.contains("GPT2LMHeadModel"),
            "{err}"
        );
        let llama = LLAMA.replacen('{', r#"{"architectures":["LlamaForCausalLM"],"#, 1);
        assert!(ModelConfig::from_json(&llama).is_ok());
        let null = LLAMA.replacen('{', r#"{"architectures":null,"#, 1);
        assert!(ModelConfig::from_json(&null).is_ok());
    }
}
