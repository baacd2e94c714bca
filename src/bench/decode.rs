//! `ual bench decode`: how fast one batch of prompts is continued, greedily, with the KV
//! cache: the time to the first token, tokens per second, and peak memory. On a real model or
//! on a preset's random weights, whose tokens are numbered words. `scripts/bench_decode_torch.py`
//! measures transformers the same way.

use std::time::Instant;

use anyhow::Result;
use serde::Serialize;

use super::MemoryProbe;
use crate::data::tokenizer::Tokenizer;
use crate::model::Llama;
use crate::model::generate::{GenerationConfig, generate};

/// One batch decoded, measured.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeBench {
    /// The device, in words.
    pub device: String,
    /// The model directory or GGUF file, or the preset.
    pub model: String,
    /// Sequences decoded together.
    pub batch_size: usize,
    /// Tokens of each prompt.
    pub prompt_tokens: usize,
    /// Tokens generated per sequence (no EOS ends one early).
    pub new_tokens: usize,
    /// Seconds to the first new token of every sequence: the prompt's pass and one token.
    pub time_to_first_token_s: f64,
    /// New tokens per second over the whole batch and the whole call, first token included.
    pub tokens_per_s: f64,
    /// The same, per sequence.
    pub tokens_per_s_per_sequence: f64,
    /// The peak of `memory_source` during the timed call.
    pub peak_memory_bytes: u64,
    /// What `peak_memory_bytes` counts.
    pub memory_source: &'static str,
    /// The process's peak resident set during the timed call (VmHWM; 0 where unknown),
    /// weights included: what `scripts/bench_decode_torch.py` reports for transformers.
    pub peak_rss_bytes: u64,
}

/// What to decode.
#[derive(Debug, Clone)]
pub struct DecodeOptions {
    /// The name the report gives the model.
    pub model: String,
    /// Sequences decoded together, each from `prompt`.
    pub batch_size: usize,
    /// Tokens generated per sequence.
    pub new_tokens: usize,
}

/// Decodes `options.batch_size` copies of `prompt`: once to warm up (kernels are compiled per
/// shape on wgpu), once for one token (the time to the first), once timed.
pub fn run(
    model: &Llama,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    options: &DecodeOptions,
    device: &str,
) -> Result<DecodeBench> {
    let prompts = vec![prompt.to_vec(); options.batch_size.max(1)];
    let streams: Vec<usize> = (0..prompts.len()).collect();
    let decode = |new_tokens: usize| -> Result<f64> {
        let config = GenerationConfig {
            max_new_tokens: new_tokens,
            ..Default::default()
        };
        let started = Instant::now();
        let out = generate(
            model,
            tokenizer,
            &[],
            &prompts,
            &streams,
            &config,
            |_, _| {},
        )?;
        anyhow::ensure!(
            out.iter().all(|g| g.ids.len() == new_tokens),
            "the model has too few positions for {new_tokens} new tokens after the prompt"
        );
        Ok(started.elapsed().as_secs_f64())
    };
    decode(options.new_tokens)?;
    let first = decode(1)?;
    let memory = MemoryProbe::new(&model.device());
    memory.reset();
    // Restarts VmHWM (Linux), so that the peak is the timed call's.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let seconds = decode(options.new_tokens)?;
    let per_sequence = options.new_tokens as f64 / seconds;
    Ok(DecodeBench {
        device: device.to_string(),
        model: options.model.clone(),
        batch_size: prompts.len(),
        prompt_tokens: prompt.len(),
        new_tokens: options.new_tokens,
        time_to_first_token_s: first,
        tokens_per_s: per_sequence * prompts.len() as f64,
        tokens_per_s_per_sequence: per_sequence,
        peak_memory_bytes: memory.peak(),
        memory_source: memory.source(),
        peak_rss_bytes: super::proc_status_kib("VmHWM:") * 1024,
    })
}

/// `n` seeded token ids in `3..vocab` (past the usual BOS and EOS), a prompt for random weights.
pub fn random_prompt(n: usize, vocab: usize) -> Vec<u32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    (0..n).map(|_| rng.random_range(3..vocab as u32)).collect()
}

/// `shape`'s model on random weights stored and computed as `types` says (the presets stand
/// for f16 checkpoints, as `bench step`'s do), and a tokenizer of numbered words to go with it.
pub fn random_model(
    shape: &super::step::PresetShape,
    device: &burn::tensor::Device,
    types: crate::model::precision::Resolved,
) -> Result<(Llama, Tokenizer)> {
    use crate::model::config::ModelConfig;
    use crate::model::load::{RandomWeights, load_llama};
    let config = ModelConfig::from_json(&shape.config_json().to_string())?;
    let weights = RandomWeights {
        seed: 0,
        std: 0.02,
        half: Some(burn::tensor::DType::F16),
    };
    let model = load_llama(&config, &weights, device, types)?;
    let model = crate::model::precision::prepare(model, types);
    Ok((model, Tokenizer::numbered(config.vocab_size)?))
}
