//! Fused linear cross-entropy: the LM head and the UAL loss a block of rows at a time, so the
//! `[rows, V]` logits never exist whole (the kernels and their backward are `crate::ops::ce`;
//! the blocks are `loss::head`'s).

use anyhow::{Result, bail};
use burn::tensor::Tensor;

use super::head::{HeadBlocks, divisor_at_most};
use super::{LossSum, RowLabels};

/// The UAL loss summed over counted rows of `hidden @ head`, with `hidden: [rows, H]` and
/// `head: [H, V]` (burn's `Linear` layout; a tied head is the embedding transposed).
/// Differentiable with respect to both; the head's gradient is formed only when it trains.
pub fn ual_linear_loss_sum(
    hidden: Tensor<2>,
    head: Tensor<2>,
    labels: &RowLabels,
    blocks: HeadBlocks,
) -> Result<LossSum> {
    let [rows, h] = hidden.dims();
    let [head_in, vocab] = head.dims();
    if h != head_in {
        bail!("fused linear loss: hidden width {h} but the head expects {head_in}");
    }
    labels.check_against([rows, vocab])?;
    let device = hidden.device();
    if rows == 0 {
        return Ok(LossSum {
            sum: Tensor::zeros([1], &device),
            count: 0,
        });
    }
    // A frozen head kept in a half type stays so: the kernels widen it a slice at a time, and
    // the loss is always computed in f32.
    let blocks = HeadBlocks {
        block_rows: blocks.block_rows.max(1),
        vocab_splits: divisor_at_most(vocab, blocks.vocab_splits),
    };
    let sum = crate::ops::ce::linear_ce_sum(hidden, head, labels.packed(&device), blocks);
    Ok(LossSum {
        sum,
        count: labels.count(),
    })
}
