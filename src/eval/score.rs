//! `ual score`: the log-probability a model assigns to each token of a text.

use anyhow::Result;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use serde::Serialize;

use crate::data::batch::{Batch, Sample};
use crate::loss::{RowLabels, ual_row_losses};
use crate::model::{Llama, Tokenizer};

/// One scored text: `logprobs[j] = log p(ids[j] | ids[<j])`, and `None` for the first token.
#[derive(Debug, Clone, Serialize)]
pub struct TokenScores {
    pub ids: Vec<u32>,
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

/// `log p(ids[j] | ids[<j])` for each position, `None` at position 0.
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
    let targets = Tensor::<3, Int>::from_data(
        TensorData::new(
            ids[1..].iter().map(|&i| i as i64).collect::<Vec<_>>(),
            [1, n - 1, 1],
        ),
        &device,
    );
    // Only the first n-1 positions predict a token that exists.
    let hidden = model.hidden_states(input).narrow(1, 0, n - 1);
    let logprobs = log_softmax(model.logits(hidden), 2).gather(2, targets);
    let values = logprobs
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 read-back");
    std::iter::once(None)
        .chain(values.into_iter().map(Some))
        .collect()
}

/// One scored data line: the mean response-token NLL and the UAL loss with the line's ε.
#[derive(Debug, Clone, Serialize)]
pub struct SampleScore {
    /// 0-based index of the line among the file's non-blank lines.
    pub index: usize,
    pub response_tokens: usize,
    pub nll: f64,
    pub loss: f64,
    pub smoothing: f32,
}

/// Scores each sample on its own: the same rows, targets and ε the trainer would use.
pub fn score_sample(model: &Llama, sample: &Sample, index: usize) -> Result<SampleScore> {
    let batch = Batch::new(&[sample], &model.device())?;
    let n = batch.labels.rows();
    let hidden = model.hidden_states(batch.ids.clone());
    let [b, s, h] = hidden.dims();
    let logits = model.logits(hidden.reshape([b * s, h]).select(0, batch.rows.clone()));
    let mean = |labels: &RowLabels| -> Result<f64> {
        let sum = ual_row_losses(logits.clone(), labels)?
            .sum()
            .into_scalar::<f32>() as f64;
        Ok(sum / n.max(1) as f64)
    };
    let plain = RowLabels::uniform(batch.labels.targets().to_vec(), 0.0)?;
    Ok(SampleScore {
        index,
        response_tokens: n,
        nll: mean(&plain)?,
        loss: mean(&batch.labels)?,
        smoothing: sample.smoothing,
    })
}

/// One data line scored under a training configuration (`ual score --data --config`): what the
/// trainer would see of it and its loss, in the configuration's own conventions.
#[derive(Debug, Clone, Serialize)]
pub struct RecipeScore {
    /// 0-based index of the line among the file's non-blank lines.
    pub index: usize,
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
    reduction: crate::loss::Reduction,
) -> Result<RecipeScore> {
    let batch = Batch::new(&[sample], &model.device())?;
    let n = batch.labels.rows();
    let hidden = model.hidden_states(batch.ids.clone());
    let [b, s, h] = hidden.dims();
    let logits = model.logits(hidden.reshape([b * s, h]).select(0, batch.rows.clone()));
    let sum = |labels: &RowLabels| -> Result<f64> {
        Ok(ual_row_losses(logits.clone(), labels)?
            .sum()
            .into_scalar::<f32>() as f64)
    };
    let plain = RowLabels::uniform(batch.labels.targets().to_vec(), 0.0)?;
    // A sample's mean over its loss tokens, or over its labelled tokens (the authors' divisor).
    let divisor = match reduction {
        crate::loss::Reduction::Tokens => n,
        crate::loss::Reduction::Samples => sample.labelled_tokens(),
    };
    let loss = sum(&batch.labels)? / divisor.max(1) as f64;
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
        nll: sum(&plain)? / n.max(1) as f64,
        loss,
    })
}

/// Every line of `data` prepared and scored as `config` trains (template, `loss_on`, the
/// mapping over the whole file, `spread`, `reduction`), in file order.
pub fn score_file(
    pretrained: &crate::model::Pretrained,
    config: &crate::train::TrainConfig,
    data: &std::path::Path,
    mut emit: impl FnMut(RecipeScore) -> Result<()>,
) -> Result<()> {
    use anyhow::Context;
    let examples = crate::data::formats::read_jsonl(data)?;
    let template = crate::data::template::Template::load(config.template, &pretrained.dir)?;
    let rules = config.sample_rules(pretrained.config.vocab_size);
    let eos = pretrained.config.eos_token_id()?;
    let (samples, _) =
        crate::data::batch::prepare(&examples, &pretrained.tokenizer, &template, eos, &rules)
            .with_context(|| data.display().to_string())?;
    for sample in &samples {
        let index = examples
            .iter()
            .position(|e| e.line == sample.line)
            .expect("sample from an example");
        emit(score_recipe(
            &pretrained.model,
            sample,
            index,
            config.reduction,
        )?)?;
    }
    Ok(())
}
