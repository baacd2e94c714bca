//! The fused loss on the CPU (burn-flex): the host loop on flex's own buffers, and the fused
//! linear cross-entropy on gemm in one block buffer.
//!
//! Through burn, each block's `hidden @ head` is a fresh tensor, and burn-flex allocates every
//! tensor twice (a zeroed byte vector, then an aligned copy of it): for the fused head that is
//! two passes over a block of memory per block, which cost the blocks their lead over the
//! unfused head. Here the block buffer is allocated once; the loss overwrites it with its
//! gradient (`host::stats_and_grad_in_place`), and gemm reads it back for the gradients.

use burn::backend::Flex;
use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::tensor::{DType, TensorData};

use super::backend::UalLossBackend;
use super::host;
use crate::ops::gemm::{Matrix, contiguous, matmul};

/// The CPU path works on flex's own buffers: it reads the logits in place and writes the
/// gradient straight into a fresh tensor, so no `[rows, V]` copy is made on the way.
impl UalLossBackend for Flex {
    fn ual_ce_forward(logits: FloatTensor<Self>, labels: FloatTensor<Self>) -> FloatTensor<Self> {
        let logits = match f32_contiguous(logits) {
            Ok(t) => t,
            Err(t) => return host::forward::<Self>(t, labels),
        };
        let [rows, vocab] = [logits.shape()[0], logits.shape()[1]];
        let z = logits.as_slice::<f32>().expect("contiguous f32");
        let stats = host::stats(z, vocab, &host::rows_of(&host::read::<Self>(labels)));
        FlexTensor::from_data(TensorData::new(stats, [rows, 2]))
    }

    fn ual_ce_backward(
        logits: FloatTensor<Self>,
        labels: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        grad_stats: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let logits = match f32_contiguous(logits) {
            Ok(t) => t,
            Err(t) => return host::backward::<Self>(t, labels, stats, grad_stats),
        };
        let labels = host::rows_of(&host::read::<Self>(labels));
        let (stats, grad_stats) = (host::read::<Self>(stats), host::read::<Self>(grad_stats));
        let shape = logits.shape();
        let (vocab, numel) = (shape[1], shape.num_elements());
        // Each gradient entry depends only on its own logit, so when nothing else holds the
        // logits (the fused head's blocks; autodiff's saved input at its last use) the gradient
        // overwrites them: one [rows, V] buffer instead of two.
        let mut logits = logits;
        let whole = logits.layout().contiguous_offsets() == Some((0, numel));
        if whole
            && let Some(z) = logits.try_storage_mut::<f32>()
            && z.len() == numel
        {
            host::write_grad_in_place(z, vocab, &labels, &stats, &grad_stats);
            return logits;
        }
        let mut grad = FlexTensor::empty(shape, DType::F32);
        host::write_grad(
            logits.as_slice::<f32>().expect("contiguous f32"),
            grad.storage_mut::<f32>(),
            vocab,
            &labels,
            &stats,
            &grad_stats,
        );
        grad
    }

    /// Unsplit heads take [`fused_head`]: one block buffer for the whole call. A split asked
    /// for on the CPU (it is a GPU occupancy measure) keeps the generic blocks, as elsewhere.
    fn ual_linear_ce_grads(
        hidden: FloatTensor<Self>,
        head: FloatTensor<Self>,
        labels: FloatTensor<Self>,
        blocks: super::backend::HeadBlocks,
        want_hidden: bool,
        want_head: bool,
    ) -> (
        FloatTensor<Self>,
        Option<FloatTensor<Self>>,
        Option<FloatTensor<Self>>,
    ) {
        if blocks.vocab_splits == 1
            && let Some(parts) = fused_head(
                &hidden,
                &head,
                &labels,
                blocks.block_rows,
                want_hidden,
                want_head,
            )
        {
            return parts;
        }
        super::backend::chunked::<Self>(hidden, head, labels, blocks, want_hidden, want_head)
    }
}

/// `t` as a contiguous f32 tensor, or `t` back unchanged when it holds another dtype.
fn f32_contiguous(t: FlexTensor) -> Result<FlexTensor, FlexTensor> {
    if t.dtype() != DType::F32 {
        return Err(t);
    }
    Ok(contiguous(t))
}

/// The fused head's loss sum `[1]` and the gradients of that sum asked for, with `hidden:
/// [rows, H]`, `head: [H, V]` and packed `labels: [rows, 3]`; `None` when a tensor is not an f32
/// matrix, so that the caller takes the generic path.
fn fused_head(
    hidden: &FlexTensor,
    head: &FlexTensor,
    labels: &FlexTensor,
    block_rows: usize,
    want_hidden: bool,
    want_head: bool,
) -> Option<(FlexTensor, Option<FlexTensor>, Option<FlexTensor>)> {
    let (hidden, head) = (Matrix::of(hidden)?, Matrix::of(head)?);
    let (rows, width, vocab) = (hidden.rows, hidden.cols, head.cols);
    let packed = host::read::<Flex>(labels.clone());
    let labels = host::rows_of(&packed);
    let block_rows = block_rows.clamp(1, rows.max(1));
    let mut block = vec![0f32; block_rows * vocab];
    let mut grad_hidden = want_hidden.then(|| vec![0f32; rows * width]);
    let mut grad_head = want_head.then(|| vec![0f32; width * vocab]);
    // ∂(Σ w·loss)/∂(loss, lse) of every row: its weight, and 0.
    let upstream = host::loss_only_upstream(&packed);
    let mut sum = 0f64;
    for start in (0..rows).step_by(block_rows) {
        let range = start..(start + block_rows).min(rows);
        let (h, r) = (hidden.row_range(range.clone()), range.len());
        let logits = &mut block[..r * vocab];
        matmul(logits, h, head, false);
        let upstream = &upstream[2 * range.start..2 * range.end];
        let stats = if want_hidden || want_head {
            host::stats_and_grad_in_place(logits, vocab, &labels[range.clone()], upstream)
        } else {
            host::stats(logits, vocab, &labels[range.clone()])
        };
        sum += stats
            .chunks_exact(2)
            .zip(upstream.chunks_exact(2))
            .map(|(s, w)| s[0] as f64 * w[0] as f64)
            .sum::<f64>();
        let grad_logits = Matrix::dense(logits, r, vocab);
        if let Some(g) = &mut grad_hidden {
            matmul(
                &mut g[range.start * width..range.end * width],
                grad_logits,
                head.t(),
                false,
            );
        }
        if let Some(g) = &mut grad_head {
            matmul(g, h.t(), grad_logits, start > 0);
        }
    }
    let tensor =
        |values: Vec<f32>, shape: [usize; 2]| FlexTensor::from_data(TensorData::new(values, shape));
    Some((
        FlexTensor::from_data(TensorData::new(vec![sum as f32], [1])),
        grad_hidden.map(|g| tensor(g, [rows, width])),
        grad_head.map(|g| tensor(g, [width, vocab])),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(values: Vec<f32>, shape: [usize; 2]) -> FlexTensor {
        FlexTensor::from_data(TensorData::new(values, shape))
    }

    #[test]
    fn other_dtypes_take_the_generic_path() {
        let hidden = tensor(vec![0.5; 6], [2, 3]);
        let head = tensor(vec![0.1; 12], [3, 4]);
        let labels = tensor(vec![1.0, 0.0, 1.0, 2.0, 0.1, 1.0], [2, 3]);
        assert!(fused_head(&hidden, &head, &labels, 1, true, true).is_some());
        let double = FlexTensor::from_data(TensorData::new(vec![0.5f64; 6], [2, 3]));
        assert!(fused_head(&double, &head, &labels, 1, true, true).is_none());
    }
}
