//! The fused linear cross-entropy on the CPU: the blocks of `super::linear`, with gemm writing
//! every block's logits into one buffer that lives for the whole call.
//!
//! Through burn, each block's `hidden @ head` is a fresh tensor, and burn-flex allocates every
//! tensor twice (a zeroed byte vector, then an aligned copy of it): for the fused head that is
//! two passes over a block of memory per block, which cost the blocks their lead over the
//! unfused head. Here the block buffer is allocated once; the loss overwrites it with its
//! gradient (`host::stats_and_grad_in_place`), and gemm reads it back for the gradients.

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::TensorData;

use super::host;
use crate::matmul::{Matrix, matmul};

/// The fused head's loss sum `[1]` and the gradients of that sum asked for, with `hidden:
/// [rows, H]`, `head: [H, V]` and packed `labels: [rows, 3]`; `None` when a tensor is not an f32
/// matrix, so that the caller takes the generic path.
pub fn fused(
    hidden: &FlexTensor,
    head: &FlexTensor,
    labels: &FlexTensor,
    chunk_rows: usize,
    want_hidden: bool,
    want_head: bool,
) -> Option<(FlexTensor, Option<FlexTensor>, Option<FlexTensor>)> {
    let (hidden, head) = (Matrix::of(hidden)?, Matrix::of(head)?);
    let (rows, width, vocab) = (hidden.rows, hidden.cols, head.cols);
    let packed = host::read::<Flex>(labels.clone());
    let labels = host::rows_of(&packed);
    let chunk_rows = chunk_rows.clamp(1, rows.max(1));
    let mut block = vec![0f32; chunk_rows * vocab];
    let mut grad_hidden = want_hidden.then(|| vec![0f32; rows * width]);
    let mut grad_head = want_head.then(|| vec![0f32; width * vocab]);
    // ∂(Σ w·loss)/∂(loss, lse) of every row: its weight, and 0.
    let upstream = super::linear::loss_only_upstream(&packed);
    let mut sum = 0f64;
    for start in (0..rows).step_by(chunk_rows) {
        let range = start..(start + chunk_rows).min(rows);
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
        assert!(fused(&hidden, &head, &labels, 1, true, true).is_some());
        let double = FlexTensor::from_data(TensorData::new(vec![0.5f64; 6], [2, 3]));
        assert!(fused(&double, &head, &labels, 1, true, true).is_none());
    }
}
