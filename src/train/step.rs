//! One optimizer step's gradients, and the held-out evaluation.

use anyhow::Result;
use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use serde::{Deserialize, Serialize};

use super::config::Recompute;
use super::recompute;
use crate::data::batch::Reduction;
use crate::data::batch::{Sample, length_buckets};
use crate::loss::Batch;
use crate::loss::HeadPlan;
use crate::loss::objective::response_loss;
use crate::model::Llama;

/// What one optimizer step's micro-batches produced.
pub struct StepGradients {
    /// The gradients of the step's loss, accumulated over its micro-batches.
    pub grads: GradientsParams,
    /// The step's loss under its reduction.
    pub loss: f64,
    /// The plain cross-entropy part of `loss` (ε = 0), on the same rows and reduction.
    pub nll: f64,
    /// Tokens of the step, padding excluded.
    pub tokens: usize,
}

/// How one optimizer step's gradients are formed: the head, what the backward pass
/// recomputes, and the reduction the loss is divided under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepPlan {
    /// How the LM head and the loss are cut.
    pub head: HeadPlan,
    /// [`Recompute::Layers`] recomputes each decoder layer from its input in the backward pass
    /// (`recompute`); the other strategies live in the autodiff `device`.
    pub recompute: Recompute,
    /// Each loss token weighs the same (`tokens`), or each sample does (`samples`).
    pub reduction: Reduction,
}

/// The gradients of one optimizer step, accumulated over its micro-batches, with the step's
/// loss and its token count (padding excluded).
///
/// Each micro-batch's summed loss is divided by `divisor`, the loss-token (or sample) count of
/// the *whole step* over every micro-batch and every rank ([`super::replicas::StepTotals`]),
/// so k micro-batches, or k ranks, give exactly the gradient of one batch holding all of them
/// (ARCHITECTURE §3). Empty micro-batches are skipped.
pub fn step_gradients(
    model: &Llama,
    micro: &[Vec<&Sample>],
    device: &burn::tensor::Device,
    plan: &StepPlan,
    divisor: f64,
) -> Result<StepGradients> {
    let StepPlan {
        head,
        recompute: strategy,
        reduction,
    } = *plan;
    let scale = if divisor > 0.0 { divisor } else { 1.0 };
    let mut accumulator = GradientsAccumulator::new();
    let (mut loss_total, mut nll_total, mut tokens) = (0.0, 0.0, 0);
    for batch_samples in micro.iter().filter(|m| !m.is_empty()) {
        let batch = Batch::with_reduction(batch_samples, reduction, device)?;
        tokens += batch.tokens;
        let (loss, nll) = if strategy == Recompute::Layers {
            recompute::accumulate_gradients(model, &batch, head, scale, &mut accumulator)?
        } else {
            let objective = response_loss(model, &batch, head)?;
            let loss = objective.loss.sum.div_scalar(scale);
            let value = loss.clone().into_scalar::<f32>();
            accumulator.accumulate(model, GradientsParams::from_grads(loss.backward(), model));
            (value, objective.nll.into_scalar::<f32>() / scale as f32)
        };
        loss_total += loss as f64;
        nll_total += nll as f64;
    }
    Ok(StepGradients {
        grads: accumulator.grads(),
        loss: loss_total,
        nll: nll_total,
        tokens,
    })
}

/// The held-out loss, and its plain cross-entropy part.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Mean UAL loss (with each sample's ε).
    pub loss: f64,
    /// Mean negative log-likelihood of the same tokens (ε = 0).
    pub nll: f64,
}

/// The mean UAL loss and NLL over `samples` under `reduction` (per loss token, or per sample),
/// without gradients or dropout; `None` for no samples.
pub fn evaluate(
    model: &Llama,
    samples: &[Sample],
    batch_size: usize,
    head: HeadPlan,
    reduction: Reduction,
) -> Result<Option<Evaluation>> {
    if samples.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        evaluation_sums(model, samples, batch_size, head, reduction)?.mean(),
    ))
}

/// The summed UAL loss and NLL over some samples, and their divisor: what ranks that each
/// evaluated a slice of the held-out set add up.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EvaluationSums {
    /// Summed UAL loss.
    pub loss: f64,
    /// Summed NLL.
    pub nll: f64,
    /// Loss tokens or samples (`reduction`).
    pub divisor: f64,
}

impl EvaluationSums {
    /// The means.
    pub fn mean(self) -> Evaluation {
        let divisor = self.divisor.max(1.0);
        Evaluation {
            loss: self.loss / divisor,
            nll: self.nll / divisor,
        }
    }
}

/// [`evaluate`]'s sums before the division.
pub fn evaluation_sums(
    model: &Llama,
    samples: &[Sample],
    batch_size: usize,
    head: HeadPlan,
    reduction: Reduction,
) -> Result<EvaluationSums> {
    let model = model.valid();
    let device = model.device();
    let mut sums = EvaluationSums::default();
    for bucket in length_buckets(samples, batch_size) {
        let batch_samples: Vec<&Sample> = bucket.iter().map(|&i| &samples[i]).collect();
        let batch = Batch::with_reduction(&batch_samples, reduction, &device)?;
        let objective = response_loss(&model, &batch, head)?;
        sums.loss += objective.loss.sum.into_scalar::<f32>() as f64;
        sums.nll += objective.nll.into_scalar::<f32>() as f64;
    }
    sums.divisor = samples.iter().map(|s| s.share(reduction)).sum::<f64>();
    Ok(sums)
}
