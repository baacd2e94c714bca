//! Local mode: uncertainty from a local model instead of an API.
//!
//! The score is the length-normalised predictive entropy of the reference response under the
//! model, mapped onto ual's 1–10 scale (the scale of its own prompt, not the authors' 0–99):
//!
//! H̄ = (1/T) Σ_t H(p(· | x, y_<t)),  H(p) = −Σ_k p_k log p_k,  score = 1 + 9 · min(1, H̄ / ln V)
//!
//! with T response tokens and V the vocabulary size (ln V is the entropy of a uniform guess).
//! A model that is sure of every next token gives 1; one that finds every token a coin toss
//! over the whole vocabulary gives 10.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::activation::log_softmax;
use indicatif::ProgressBar;

use super::{Outcome, Summary, read_lines, write_outputs};
use crate::data::batch::{Prepare, Sample};
use crate::data::formats::read_jsonl;
use crate::data::template::Template;
use crate::loss::Batch;
use crate::loss::head::default_block_rows;
use crate::model::{Llama, Pretrained};

/// `score = 1 + 9 · min(1, mean_entropy / ln vocab)`.
pub fn entropy_score(mean_entropy: f64, vocab: usize) -> f64 {
    1.0 + 9.0 * (mean_entropy / (vocab as f64).ln()).clamp(0.0, 1.0)
}

/// Scores each line of `input` by `model`'s predictive entropy over its reference response,
/// rendered with `template` and cut at the model's context window, and writes `output`.
pub fn run_local(
    input: &Path,
    output: &Path,
    model: &Pretrained,
    template: &Template,
    limit: Option<usize>,
) -> Result<Summary> {
    let started = Instant::now();
    let lines = read_lines(input, limit)?;
    let mut examples = read_jsonl(input)?;
    examples.truncate(lines.len());
    // Scores already in the input play no part in the entropy, nor in its scale.
    examples.iter_mut().for_each(|e| e.uncertainty = None);
    let eos = model.config.eos_token_id()?;
    let window = model.config.max_position_embeddings;
    let (samples, _) = Prepare::new(&model.tokenizer, template, eos, window)
        .examples(&examples)
        .with_context(|| input.display().to_string())?;
    let mut outcomes: Vec<Option<Outcome>> = (0..lines.len())
        .map(|_| {
            Some(Outcome::Failed(format!(
                "the prompt alone fills the model's {window}-token window"
            )))
        })
        .collect();
    let index = crate::data::formats::line_index(&examples);
    let progress = ProgressBar::new(samples.len() as u64);
    for sample in &samples {
        let entropy = mean_entropy(&model.model, sample)?;
        let score = entropy_score(entropy, model.config.vocab_size);
        outcomes[index[&sample.line]] = Some(Outcome::Scored(score));
        progress.inc(1);
    }
    progress.finish_and_clear();
    let source = format!("entropy:{}", model.dir.display());
    let scale = crate::uncertainty::UAL_SCALE;
    write_outputs(output, &lines, &outcomes, &source, scale, (started, 0, 0))
}

/// The mean predictive entropy over a sample's response tokens, the head run on row blocks so
/// that no more than a block's logits exist at once.
fn mean_entropy(model: &Llama, sample: &Sample) -> Result<f64> {
    let batch = Batch::new(&[sample], &model.device())?;
    let hidden = model.hidden_states(batch.ids.clone());
    let [b, s, h] = hidden.dims();
    let rows = hidden.reshape([b * s, h]).select(0, batch.rows.clone());
    let n = batch.labels.rows();
    let block = default_block_rows(model.config.vocab_size);
    let mut entropy = 0.0;
    for start in (0..n).step_by(block) {
        let logits = model.logits(rows.clone().narrow(0, start, block.min(n - start)));
        let log_p = log_softmax(logits, 1);
        entropy -= log_p.clone().exp().mul(log_p).sum().into_scalar::<f32>() as f64;
    }
    Ok(entropy / n.max(1) as f64)
}
