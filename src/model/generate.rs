//! Decoding: greedy or sampled, batched with left padding, over a key/value cache preallocated
//! per sequence, so each new token costs one position's work rather than the whole prefix's.
//!
//! Left padding follows transformers' `generate`: a sequence's rotary positions start at 0 on
//! its first real token, and padded slots are masked out as keys.

use anyhow::{Result, bail};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::llama::{LayerCache, Llama};
use crate::data::tokenizer::Tokenizer;

/// Additive mask value for hidden keys; finite so a fully masked (padding) row stays finite.
const MASKED: f32 = -1e30;

/// How to decode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    /// The most tokens generated per prompt.
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f64,
    /// The sampling seed: the prompt at index `i` of its input draws from stream `seed + i`
    /// ([`GenerationConfig::stream`]), whatever batch it is decoded in.
    pub seed: u64,
    /// Generation stops when the text contains one of these; the text is cut before it.
    pub stop: Vec<String>,
    /// Off recomputes the whole prefix at every step (the baseline the cache is measured against).
    pub use_cache: bool,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
            use_cache: true,
        }
    }
}

impl GenerationConfig {
    /// The sampling stream of the prompt at `index` in its input. One stream per prompt, not
    /// per batch, so that a seed gives the same samples at any batch size; `seed + index` keeps
    /// the streams of callers that seeded item `i` with `seed + i` one prompt at a time.
    pub fn stream(&self, index: usize) -> StdRng {
        StdRng::seed_from_u64(self.seed.wrapping_add(index as u64))
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    /// The model wrote an end-of-sequence token.
    Eos,
    /// The text reached a stop string.
    Stop,
    /// `max_new_tokens` were generated.
    Length,
    /// Not generated: the prompt alone filled the model's positions (`--on-long-prompt skip`).
    Skipped,
}

/// One decoded sequence.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// Generated ids, without the prompt; the EOS that ended it is not included.
    pub ids: Vec<u32>,
    /// The decoded continuation, cut before any stop string.
    pub text: String,
    /// Why decoding stopped.
    pub finish: Finish,
}

/// `wanted` new tokens, capped so that the longest prompt and its continuation fit the model's
/// `max_position_embeddings` (positions past it were never trained; a sequence capped so
/// finishes with [`Finish::Length`]). A prompt that alone fills them is an error.
pub fn new_token_budget(model: &Llama, prompts: &[Vec<u32>], wanted: usize) -> Result<usize> {
    let positions = model.config.max_position_embeddings;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if longest >= positions {
        bail!("the prompt has {longest} tokens; the model has {positions} positions");
    }
    Ok(wanted.min(positions - longest))
}

/// Decodes a continuation of each prompt, together in one left-padded batch. `streams[i]` is
/// prompt `i`'s index in its input, which picks its sampling stream
/// ([`GenerationConfig::stream`]). `on_text(i, delta)` receives each new piece of sequence
/// `i`'s text as soon as it is known, for streaming.
pub fn generate(
    model: &Llama,
    tokenizer: &Tokenizer,
    eos: &[u32],
    prompts: &[Vec<u32>],
    streams: &[usize],
    config: &GenerationConfig,
    mut on_text: impl FnMut(usize, &str),
) -> Result<Vec<Generation>> {
    if prompts.iter().any(|p| p.is_empty()) {
        bail!("cannot generate from an empty prompt");
    }
    assert_eq!(prompts.len(), streams.len(), "one stream per prompt");
    let model = &model.with_f32_head();
    let max_new_tokens = new_token_budget(model, prompts, config.max_new_tokens)?;
    let mut rngs: Vec<StdRng> = streams.iter().map(|&i| config.stream(i)).collect();
    let mut decoder = Decoder::new(model, prompts, max_new_tokens);
    let mut out: Vec<Generation> = prompts
        .iter()
        .map(|_| Generation {
            ids: Vec::new(),
            text: String::new(),
            finish: Finish::Length,
        })
        .collect();
    let mut done = vec![false; prompts.len()];
    let mut logits = if config.use_cache {
        decoder.prefill()
    } else {
        decoder.recompute()
    };
    for _ in 0..max_new_tokens {
        let mut next = Vec::with_capacity(prompts.len());
        for (i, row) in logits.iter().enumerate() {
            if done[i] {
                // A finished sequence rides along until the batch ends; what it is fed is
                // never read, and its stream is not drawn from.
                next.push(0);
                continue;
            }
            let token = choose(row, config, &mut rngs[i]);
            next.push(token);
            if eos.contains(&token) {
                (done[i], out[i].finish) = (true, Finish::Eos);
                continue;
            }
            out[i].ids.push(token);
            let text = tokenizer.decode(&out[i].ids)?;
            let (text, stopped) = cut_at_stop(&text, &config.stop);
            if text.len() > out[i].text.len() && text.starts_with(&out[i].text) {
                on_text(i, &text[out[i].text.len()..]);
            }
            out[i].text = text.to_string();
            if stopped {
                (done[i], out[i].finish) = (true, Finish::Stop);
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        logits = if config.use_cache {
            decoder.step(&next)
        } else {
            decoder.append_and_recompute(&next)
        };
    }
    Ok(out)
}

/// The text before the first stop string, and whether one was found.
fn cut_at_stop<'a>(text: &'a str, stop: &[String]) -> (&'a str, bool) {
    match stop
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
    {
        Some(at) => (&text[..at], true),
        None => (text, false),
    }
}

/// Greedy (argmax, first index on ties, as torch) or temperature / top-k / top-p sampling.
pub fn choose(logits: &[f32], config: &GenerationConfig, rng: &mut StdRng) -> u32 {
    if config.temperature <= 0.0 {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if config.top_k > 0 {
        order.truncate(config.top_k);
    }
    let max = logits[order[0]] as f64;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / config.temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if config.top_p < 1.0 {
        let mut mass = 0.0;
        let keep = probs.iter().position(|p| {
            mass += p;
            mass >= config.top_p
        });
        let keep = keep.map(|k| k + 1).unwrap_or(probs.len());
        order.truncate(keep);
        probs.truncate(keep);
    }
    let mut draw = rng.random::<f64>() * probs.iter().sum::<f64>();
    for (&i, p) in order.iter().zip(&probs) {
        draw -= p;
        if draw <= 0.0 {
            return i as u32;
        }
    }
    *order.last().expect("at least one token") as u32
}

/// The decoding state of a batch: slots `0..len` of every sequence, left-padded prompts first.
struct Decoder<'a> {
    model: &'a Llama,
    device: Device,
    /// Row-major `[batch, len]` token ids, padding included.
    ids: Vec<u32>,
    pads: Vec<usize>,
    len: usize,
    cache: Vec<LayerCache>,
}

impl<'a> Decoder<'a> {
    fn new(model: &'a Llama, prompts: &[Vec<u32>], max_new_tokens: usize) -> Self {
        let device = model.device();
        let len = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let pads: Vec<usize> = prompts.iter().map(|p| len - p.len()).collect();
        let ids = prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(0, len - p.len()).chain(p.iter().copied()))
            .collect();
        let c = &model.config;
        let shape = [
            prompts.len(),
            c.num_key_value_heads,
            len + max_new_tokens,
            c.head_dim,
        ];
        let cache = (0..c.num_hidden_layers)
            .map(|_| LayerCache {
                keys: Tensor::zeros(shape, &device),
                values: Tensor::zeros(shape, &device),
            })
            .collect();
        Self {
            model,
            device,
            ids,
            pads,
            len,
            cache,
        }
    }

    fn batch(&self) -> usize {
        self.pads.len()
    }

    /// Runs the whole prompt through the model, filling the cache; last-position logits.
    fn prefill(&mut self) -> Vec<Vec<f32>> {
        let ids = self.ids.clone();
        self.forward(&ids, 0, self.len)
    }

    /// Appends one token per sequence and runs only it; its logits.
    fn step(&mut self, next: &[u32]) -> Vec<Vec<f32>> {
        self.push(next);
        self.forward(next, self.len - 1, 1)
    }

    /// The uncached baseline: every slot so far, from an empty cache.
    fn recompute(&mut self) -> Vec<Vec<f32>> {
        let ids = self.ids.clone();
        self.forward(&ids, 0, self.len)
    }

    fn append_and_recompute(&mut self, next: &[u32]) -> Vec<Vec<f32>> {
        self.push(next);
        self.recompute()
    }

    fn push(&mut self, next: &[u32]) {
        let (b, len) = (self.batch(), self.len);
        let mut ids = Vec::with_capacity(b * (len + 1));
        for (i, &token) in next.iter().enumerate() {
            ids.extend_from_slice(&self.ids[i * len..(i + 1) * len]);
            ids.push(token);
        }
        self.ids = ids;
        self.len += 1;
    }

    /// Runs `n` slots starting at `start` (ids row-major `[batch, n]`); the last slot's logits.
    fn forward(&mut self, ids: &[u32], start: usize, n: usize) -> Vec<Vec<f32>> {
        let b = self.batch();
        let positions: Vec<usize> = self
            .pads
            .iter()
            .flat_map(|&pad| (start..start + n).map(move |slot| slot.saturating_sub(pad)))
            .collect();
        let mask = self.mask(start, n);
        let ids = Tensor::<2, Int>::from_data(
            TensorData::new(ids.iter().map(|&t| t as i64).collect::<Vec<_>>(), [b, n]),
            &self.device,
        );
        let hidden =
            self.model
                .hidden_states_cached(ids, &positions, &mask, &mut self.cache, start);
        let [_, _, h] = hidden.dims();
        let logits = self
            .model
            .logits(hidden.narrow(1, n - 1, 1).reshape([b, h]));
        let vocab = logits.dims()[1];
        let values = logits
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32 logits");
        values.chunks_exact(vocab).map(<[f32]>::to_vec).collect()
    }

    /// `[batch, 1, n, start + n]`: query slot `q` sees key slot `k` when `k <= q`, `k` is not
    /// padding, and (with a sliding window `w`) their positions differ by less than `w`.
    fn mask(&self, start: usize, n: usize) -> Tensor<4> {
        let b = self.batch();
        let total = start + n;
        let window = self.model.config.sliding_window.unwrap_or(usize::MAX);
        let mut values = Vec::with_capacity(b * n * total);
        for &pad in &self.pads {
            for q in start..start + n {
                values.extend((0..total).map(|k| {
                    if k <= q && k >= pad && q - k < window {
                        0.0
                    } else {
                        MASKED
                    }
                }));
            }
        }
        Tensor::from_data(TensorData::new(values, [b, 1, n, total]), &self.device)
    }
}

/// Logits of every step of cached decoding along a fixed continuation, for testing the cache
/// against a full forward pass: row `j` predicts token `prompt.len() + j`.
pub fn cached_logits_along(model: &Llama, prompt: &[u32], continuation: &[u32]) -> Vec<Vec<f32>> {
    let mut decoder = Decoder::new(model, &[prompt.to_vec()], continuation.len());
    let mut rows = decoder.prefill();
    for &token in continuation {
        rows.extend(decoder.step(&[token]));
    }
    rows
}
