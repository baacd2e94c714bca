//! The training objective on one batch: hidden states, then only the response rows through the
//! LM head and the UAL loss.

use anyhow::Result;
use burn::tensor::{Int, Tensor, TensorData};

use super::Batch;
use crate::loss::linear::{HeadBlocks, default_chunk_rows, divisor_at_most, gpu_vocab_splits};
use crate::loss::{LossSum, RowLabels, ual_linear_loss_sum, ual_loss_sum};
use crate::model::Llama;

/// How the LM head and the loss are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadPlan {
    /// The fused linear cross-entropy (`loss::linear`): no `[rows, V]` logits tensor.
    pub fused: bool,
    /// Rows per block: of the fused head, or of the unfused logits (one binding's worth on wgpu).
    pub rows_per_chunk: usize,
    /// Vocabulary slices of the fused head's hidden gradient ([`HeadBlocks::vocab_splits`]).
    pub vocab_splits: usize,
}

impl HeadPlan {
    /// The fused head in blocks of [`default_chunk_rows`], capped at what one binding holds.
    pub fn fused(vocab: usize, rows_per_binding: usize) -> Self {
        Self::new(true, vocab, rows_per_binding, 0)
    }

    /// Logits for `rows_per_chunk` rows at a time, then the fused loss on them.
    pub fn unfused(rows_per_chunk: usize) -> Self {
        Self {
            fused: false,
            rows_per_chunk,
            vocab_splits: 1,
        }
    }

    /// The plan a training configuration asks for; `block_rows` 0 means [`default_chunk_rows`].
    pub fn new(fused: bool, vocab: usize, rows_per_binding: usize, block_rows: usize) -> Self {
        if !fused {
            return Self::unfused(rows_per_binding);
        }
        let rows = match block_rows {
            0 => default_chunk_rows(vocab),
            rows => rows,
        };
        Self {
            fused: true,
            rows_per_chunk: rows.min(rows_per_binding),
            vocab_splits: 1,
        }
    }

    /// Splits the fused head's hidden gradient over the vocabulary: `setting` slices, or with 0
    /// as many as fill a hardware GPU ([`gpu_vocab_splits`]) and none on a CPU or a software
    /// adapter, whose few cores the unsplit blocks already keep busy.
    pub fn split_vocab(mut self, setting: usize, hidden: usize, vocab: usize, gpu: bool) -> Self {
        self.vocab_splits = match setting {
            _ if !self.fused => 1,
            0 if gpu => gpu_vocab_splits(self.rows_per_chunk, hidden, vocab),
            0 => 1,
            n => divisor_at_most(vocab, n),
        };
        self
    }

    /// `model` with its head stored the way this plan reads it: vocabulary-major when the
    /// hidden gradient is split, so that the slices are views ([`Llama::with_vocab_major_head`]).
    pub fn arrange(self, model: Llama) -> Llama {
        match self.vocab_splits {
            1 => model,
            _ => model.with_vocab_major_head(),
        }
    }

    /// The fused head's blocks.
    pub fn blocks(self) -> HeadBlocks {
        HeadBlocks {
            rows: self.rows_per_chunk,
            vocab_splits: self.vocab_splits,
        }
    }
}

/// A batch's summed loss, with the plain cross-entropy part of it for reporting.
pub struct ObjectiveLoss {
    /// The weighted UAL loss summed over the loss rows; differentiable.
    pub loss: LossSum,
    /// The same rows' weighted negative log-likelihood (ε = 0), detached: what the loss would
    /// be without smoothing, so that runs with different ε report comparable numbers.
    pub nll: Tensor<1>,
}

/// The summed UAL loss over the batch's response tokens, and their count.
///
/// Prompt and padding positions never reach the head: the response rows are gathered first.
pub fn response_loss(model: &Llama, batch: &Batch, head: HeadPlan) -> Result<ObjectiveLoss> {
    head_loss(model, model.hidden_states(batch.ids.clone()), batch, head)
}

/// The summed UAL loss of the response rows of final-norm `hidden: [batch, len, hidden]`.
pub fn head_loss(
    model: &Llama,
    hidden: Tensor<3>,
    batch: &Batch,
    head: HeadPlan,
) -> Result<ObjectiveLoss> {
    let [b, s, h] = hidden.dims();
    let labels = &batch.labels;
    if labels.rows() == 0 {
        let zero = Tensor::zeros([1], &hidden.device());
        return Ok(ObjectiveLoss {
            loss: LossSum {
                sum: zero.clone(),
                count: 0,
            },
            nll: zero,
        });
    }
    let response = hidden.reshape([b * s, h]).select(0, batch.rows.clone());
    let gap = smoothing_gap(model, &response, labels);
    let loss = match model.head_weight() {
        Some(weight) if head.fused => ual_linear_loss_sum(response, weight, labels, head.blocks())?,
        _ => unfused_loss(model, response, labels, head)?,
    };
    let nll = loss.sum.clone().detach() + gap;
    Ok(ObjectiveLoss { loss, nll })
}

/// Logits for `head.rows_per_chunk` rows at a time, then the fused loss on each block.
fn unfused_loss(
    model: &Llama,
    response: Tensor<2>,
    labels: &RowLabels,
    head: HeadPlan,
) -> Result<LossSum> {
    let n = labels.rows();
    let mut sum: Option<Tensor<1>> = None;
    let chunk = head.rows_per_chunk.max(1);
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let logits = model.logits(response.clone().narrow(0, start, len));
        let part = ual_loss_sum(logits, &labels.slice(start..start + len))?.sum;
        sum = Some(match sum {
            Some(total) => total + part,
            None => part,
        });
    }
    Ok(LossSum {
        sum: sum.expect("at least one chunk"),
        count: n,
    })
}

/// `Σ_r w_r·ε_r·(mean_k z_rk − z_{r,y_r})`: what turns the summed UAL loss into the summed NLL.
///
/// A row's UAL loss is `lse − (1 − ε)·z_y − ε·mean z`, so its NLL `lse − z_y` is the loss plus
/// `ε·(mean z − z_y)`. Both logits are linear in the hidden state: `mean z = h·mean_k W_k` and
/// `z_y = h·W_y`, an `[rows, H]` computation with no `[rows, V]` block, without gradients.
/// Nothing is computed when no row is smoothed.
fn smoothing_gap(model: &Llama, response: &Tensor<2>, labels: &RowLabels) -> Tensor<1> {
    let device = response.device();
    let coefficients: Vec<f32> = labels
        .weights()
        .iter()
        .zip(labels.smoothing())
        .map(|(w, e)| w * e)
        .collect();
    if coefficients.iter().all(|&c| c == 0.0) {
        return Tensor::zeros([1], &device);
    }
    let n = labels.rows();
    let response = response.clone().detach();
    let targets: Vec<i64> = labels.targets().iter().map(|&t| t as i64).collect();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [n]), &device);
    let c = Tensor::<2>::from_data(TensorData::new(coefficients, [n, 1]), &device);
    let (mean_logit, target_logit) = match model.head_weight() {
        Some(weight) => {
            let weight = weight.detach().cast(response.dtype());
            let mean_column = weight.clone().mean_dim(1);
            let target_rows = weight.transpose().select(0, targets);
            (
                response.clone().matmul(mean_column),
                (response * target_rows).sum_dim(1),
            )
        }
        None => {
            let logits = model.logits(response).detach();
            (
                logits.clone().mean_dim(1),
                logits.gather(1, targets.unsqueeze_dim(1)),
            )
        }
    };
    ((mean_logit - target_logit) * c).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_rows_are_the_default_or_asked_for_and_fit_a_binding() {
        let default = default_chunk_rows(32_000);
        assert_eq!(
            HeadPlan::new(true, 32_000, usize::MAX, 0).rows_per_chunk,
            default
        );
        assert_eq!(
            HeadPlan::new(true, 32_000, usize::MAX, 1024).rows_per_chunk,
            1024
        );
        assert_eq!(HeadPlan::new(true, 32_000, 500, 1024).rows_per_chunk, 500);
        let unfused = HeadPlan::new(false, 32_000, 700, 1024);
        assert!(!unfused.fused);
        assert_eq!(unfused.rows_per_chunk, 700);
    }

    #[test]
    fn vocabulary_splits_are_automatic_on_gpus_only_and_can_be_forced() {
        let fused = HeadPlan::new(true, 32_000, usize::MAX, 0);
        assert_eq!(fused.split_vocab(0, 768, 32_000, true).vocab_splits, 20);
        assert_eq!(fused.split_vocab(0, 768, 32_000, false).vocab_splits, 1);
        assert_eq!(fused.split_vocab(8, 768, 32_000, false).vocab_splits, 8);
        assert_eq!(fused.split_vocab(1, 768, 32_000, true).vocab_splits, 1);
        // 24 does not divide 32,000: the largest count that does.
        assert_eq!(fused.split_vocab(24, 768, 32_000, false).vocab_splits, 20);
        let unfused = HeadPlan::new(false, 32_000, 700, 0);
        assert_eq!(unfused.split_vocab(8, 768, 32_000, true).vocab_splits, 1);
    }
}
