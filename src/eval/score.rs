//! `ual score`: the log-probability a model assigns to each token of a text.

use std::path::Path;

use anyhow::Result;
use burn::tensor::{Int, Tensor, TensorData};
use serde::Serialize;

use crate::data::batch::{Prepare, Reduction, Sample};
use crate::data::template::Template;
use crate::loss::Batch;
use crate::loss::HeadPlan;
use crate::loss::head::default_block_rows;
use crate::loss::objective::response_loss;
use crate::model::{Llama, Pretrained, Tokenizer};
use crate::ops::lanes;
use crate::train::TrainConfig;

/// One scored text: `logprobs[j] = log p(ids[j] | ids[<j])`, and `None` for the first token.
#[derive(Debug, Clone, Serialize)]
pub struct TokenScores {
    /// The text's token ids, special tokens included.
    pub ids: Vec<u32>,
    /// `log p(ids[j] | ids[<j])`, `None` for the first token.
    pub logprobs: Vec<Option<f32>>,
}

/// Tokenises `text` with the model's special tokens and scores every token after the first.
pub fn score_text(model: &Llama, tokenizer: &Tokenizer, text: &str) -> Result<TokenScores> {
    let ids = tokenizer.encode(text)?;
    Ok(TokenScores {
        logprobs: token_logprobs(model, &ids),
        ids,
    })
}

/// `log p(ids[j] | ids[<j])` for each position, `None` at position 0. The head runs on blocks
/// of rows, so at most a block's `[rows, V]` logits exist at once.
pub fn token_logprobs(model: &Llama, ids: &[u32]) -> Vec<Option<f32>> {
    let n = ids.len();
    if n < 2 {
        return vec![None; n];
    }
    let device = model.device();
    let input = Tensor::<2, Int>::from_data(
        TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [1, n]),
        &device,
    );
    // Only the first n-1 positions predict a token that exists.
    let hidden = model.hidden_states(input).narrow(1, 0, n - 1);
    let vocab = model.config.vocab_size;
    let block = default_block_rows(vocab);
    let mut values = Vec::with_capacity(n - 1);
    for start in (0..n - 1).step_by(block) {
        let len = block.min(n - 1 - start);
        let targets = &ids[start + 1..start + 1 + len];
        let logits = model.logits(hidden.clone().narrow(1, start, len));
        let logits = logits.into_data().convert::<f32>();
        let rows = logits.as_slice::<f32>().expect("f32 logits");
        values.extend(
            targets
                .iter()
                .zip(rows.chunks_exact(vocab))
                .map(|(&t, z)| logprob(z, t)),
        );
    }
    std::iter::once(None)
        .chain(values.into_iter().map(Some))
        .collect()
}

/// `log softmax(z)[target]`, its normaliser summed in f64: an f32 sum over a 49k vocabulary
/// drifts by ~1e-4, which is what a 30-layer model's log-probs were off by against float64.
fn logprob(z: &[f32], target: u32) -> f32 {
    let max = lanes::row_max(z);
    let log_sum = lanes::exp_sum(z, max).ln();
    ((z[target as usize] - max) as f64 - log_sum) as f32
}

/// One scored data line: the mean response-token NLL and the UAL loss with the line's ε.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SampleScore {
    /// 0-based index of the line among the file's non-blank lines.
    pub index: usize,
    /// Tokens that carry loss.
    pub response_tokens: usize,
    /// Mean NLL over them.
    pub nll: f64,
    /// Mean UAL loss over them, with the line's ε.
    pub loss: f64,
    /// The ε the kernels apply (mass ε/V on every token).
    pub smoothing: f32,
}

/// Scores each sample on its own: the same rows, targets and ε the trainer would use.
pub fn score_sample(model: &Llama, sample: &Sample, index: usize) -> Result<SampleScore> {
    let (loss, nll, n) = summed_losses(model, sample)?;
    Ok(SampleScore {
        index,
        response_tokens: n,
        nll: nll / n.max(1) as f64,
        loss: loss / n.max(1) as f64,
        smoothing: sample.smoothing,
    })
}

/// A sample's summed UAL loss and NLL over its loss tokens, and their count, through the fused
/// head in row blocks, so that no `[rows, V]` logits tensor exists.
fn summed_losses(model: &Llama, sample: &Sample) -> Result<(f64, f64, usize)> {
    let batch = Batch::new(&[sample], &model.device())?;
    let head = HeadPlan::fused(model.config.vocab_size, usize::MAX);
    let objective = response_loss(model, &batch, head)?;
    Ok((
        objective.loss.sum.into_scalar::<f32>() as f64,
        objective.nll.into_scalar::<f32>() as f64,
        batch.labels.rows(),
    ))
}

/// One data line scored under a training configuration (`ual score --data --config`): what the
/// trainer would see of it and its loss, in the configuration's own conventions.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RecipeScore {
    /// 0-based index of the line among the file's non-blank lines.
    pub index: usize,
    /// The sample's token ids.
    pub ids: Vec<u32>,
    /// `loss_mask[j]`: the token at position j is predicted with loss.
    pub loss_mask: Vec<bool>,
    /// The sample's ε in the configuration's convention (the authors' `smooth_value` under
    /// their recipe).
    pub epsilon: f64,
    /// Mean NLL over the loss positions.
    pub nll: f64,
    /// The UAL loss of this line alone under the configuration's reduction.
    pub loss: f64,
}

/// Scores `sample` as the trainer would weigh it under `reduction`.
pub fn score_recipe(
    model: &Llama,
    sample: &Sample,
    index: usize,
    reduction: Reduction,
) -> Result<RecipeScore> {
    let (loss, nll, n) = summed_losses(model, sample)?;
    // A sample's mean over its loss tokens, or over its labelled tokens (the authors' divisor).
    let divisor = match reduction {
        Reduction::Tokens => n,
        Reduction::Samples => sample.labelled_tokens(),
    };
    Ok(RecipeScore {
        index,
        ids: sample.ids.clone(),
        loss_mask: sample
            .loss_mask
            .iter()
            .enumerate()
            .map(|(j, &m)| m && j > 0)
            .collect(),
        epsilon: sample.epsilon,
        nll: nll / n.max(1) as f64,
        loss: loss / divisor.max(1) as f64,
    })
}

/// Every line of `data` prepared and scored as `config` trains (`loss_on`, the mapping over
/// the whole file, `spread`, `reduction`) in `template`, in file order.
pub fn score_file(
    pretrained: &Pretrained,
    config: &TrainConfig,
    template: &Template,
    data: &Path,
    emit: impl FnMut(RecipeScore) -> Result<()>,
) -> Result<()> {
    let eos = pretrained.config.eos_token_id()?;
    let rules = config.sample_rules(pretrained.config.vocab_size);
    let prepare =
        Prepare::new(&pretrained.tokenizer, template, eos, config.max_seq_len).with_rules(rules);
    let score =
        |sample: &Sample, index| score_recipe(&pretrained.model, sample, index, config.reduction);
    score_lines(&prepare, data, score, emit)
}

/// Every line of `data` with the trainer's tokenisation and ual's default ε mapping, scored on
/// its own, in file order.
pub fn score_data(
    pretrained: &Pretrained,
    template: &Template,
    data: &Path,
    max_seq_len: usize,
    emit: impl FnMut(SampleScore) -> Result<()>,
) -> Result<()> {
    let eos = pretrained.config.eos_token_id()?;
    let prepare = Prepare::new(&pretrained.tokenizer, template, eos, max_seq_len);
    let score = |sample: &Sample, index| score_sample(&pretrained.model, sample, index);
    score_lines(&prepare, data, score, emit)
}

/// Prepares `data`, then emits `score(sample, its line's index)` for each sample in order,
/// as it goes. Under `mpirun` the ranks score slices of the file and rank 0 alone emits them
/// all, in order, at the end.
fn score_lines<T: serde::Serialize + serde::de::DeserializeOwned>(
    prepare: &Prepare,
    data: &Path,
    mut score: impl FnMut(&Sample, usize) -> Result<T>,
    mut emit: impl FnMut(T) -> Result<()>,
) -> Result<()> {
    let (examples, samples, _) = prepare.file(data)?;
    let index = crate::data::formats::line_index(&examples);
    let cluster = crate::cluster::world();
    if !cluster.is_parallel() {
        for sample in &samples {
            emit(score(sample, index[&sample.line])?)?;
        }
        return Ok(());
    }
    let scored = cluster.share_work(&samples, "scoring the lines", |_, sample| {
        score(sample, index[&sample.line])
    })?;
    if cluster.is_root() {
        scored.into_iter().try_for_each(emit)?;
    }
    Ok(())
}
