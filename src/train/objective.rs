//! The training objective on one batch: hidden states, then only the response rows through the
//! LM head and the UAL loss.

use anyhow::Result;
use burn::tensor::Tensor;

use crate::data::batch::Batch;
use crate::loss::linear::{HeadBlocks, default_chunk_rows, divisor_at_most, gpu_vocab_splits};
use crate::loss::{LossSum, ual_linear_loss_sum, ual_loss_sum};
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

/// The summed UAL loss over the batch's response tokens, and their count.
///
/// Prompt and padding positions never reach the head: the response rows are gathered first.
pub fn response_loss(model: &Llama, batch: &Batch, head: HeadPlan) -> Result<LossSum> {
    head_loss(model, model.hidden_states(batch.ids.clone()), batch, head)
}

/// The summed UAL loss of the response rows of final-norm `hidden: [batch, len, hidden]`.
pub fn head_loss(
    model: &Llama,
    hidden: Tensor<3>,
    batch: &Batch,
    head: HeadPlan,
) -> Result<LossSum> {
    let [b, s, h] = hidden.dims();
    let n = batch.labels.rows();
    let device = hidden.device();
    if n == 0 {
        return Ok(LossSum {
            sum: Tensor::zeros([1], &device),
            count: 0,
        });
    }
    let response = hidden.reshape([b * s, h]).select(0, batch.rows.clone());
    if head.fused
        && let Some(weight) = model.head_weight()
    {
        return ual_linear_loss_sum(response, weight, &batch.labels, head.blocks());
    }
    let mut sum: Option<Tensor<1>> = None;
    let chunk = head.rows_per_chunk.max(1);
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let logits = model.logits(response.clone().narrow(0, start, len));
        let part = ual_loss_sum(logits, &batch.labels.slice(start..start + len))?.sum;
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
