//! The fused linear cross-entropy on the CPU: the blocks of `super::linear`, with gemm writing
//! every block's logits into one buffer that lives for the whole call.
//!
//! Through burn, each block's `hidden @ head` is a fresh tensor, and burn-flex allocates every
//! tensor twice (a zeroed byte vector, then an aligned copy of it): for the fused head that is
//! two passes over a block of memory per block, which cost the blocks their lead over the
//! unfused head. Here the block buffer is allocated once; the loss overwrites it with its
//! gradient (`host::stats_and_grad_in_place`), and gemm reads it back for the gradients.

use std::ops::Range;

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, TensorData};

use super::host;

/// A strided f32 matrix inside a buffer: element (i, j) is `data[offset + i·rs + j·cs]`.
#[derive(Clone, Copy)]
struct Matrix<'a> {
    data: &'a [f32],
    offset: usize,
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
}

impl<'a> Matrix<'a> {
    /// A 2-D f32 tensor with non-negative strides, as flex stores it.
    fn of(t: &'a FlexTensor) -> Option<Self> {
        let layout = t.layout();
        if t.dtype() != DType::F32 || layout.num_dims() != 2 {
            return None;
        }
        let (shape, strides) = (layout.shape(), layout.strides());
        if strides.iter().any(|&s| s < 0) {
            return None;
        }
        Some(Self {
            data: t.storage::<f32>(),
            offset: layout.start_offset(),
            rows: shape[0],
            cols: shape[1],
            rs: strides[0],
            cs: strides[1],
        })
        .filter(Self::in_bounds)
    }

    /// A row-major buffer of `rows` × `cols`.
    fn dense(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            offset: 0,
            rows,
            cols,
            rs: cols as isize,
            cs: 1,
        }
    }

    fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    fn row_range(self, range: Range<usize>) -> Self {
        Self {
            offset: self.offset + range.start * self.rs as usize,
            rows: range.len(),
            ..self
        }
    }

    /// Whether the last element lies inside the buffer (strides are non-negative).
    fn in_bounds(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last =
            self.offset + (self.rows - 1) * self.rs as usize + (self.cols - 1) * self.cs as usize;
        last < self.data.len()
    }
}

/// `dst = lhs @ rhs`, or `dst += lhs @ rhs` when `accumulate`; `dst` is row-major `m × n`.
fn matmul(dst: &mut [f32], lhs: Matrix, rhs: Matrix, accumulate: bool) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert!(rhs.rows == k && dst.len() == m * n, "matmul shapes");
    assert!(
        lhs.in_bounds() && rhs.in_bounds(),
        "matmul operands in bounds"
    );
    // As burn-flex decides: threads only where the product is worth them.
    let parallelism = if m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the shapes agree and every element of both operands and of `dst` is inside its
    // buffer (checked above; strides are non-negative), and `dst` is borrowed mutably.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr().add(lhs.offset),
            lhs.cs,
            lhs.rs,
            rhs.data.as_ptr().add(rhs.offset),
            rhs.cs,
            rhs.rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

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
    let labels = host::rows_of(&host::read::<Flex>(labels.clone()));
    let chunk_rows = chunk_rows.clamp(1, rows.max(1));
    let mut block = vec![0f32; chunk_rows * vocab];
    let mut grad_hidden = want_hidden.then(|| vec![0f32; rows * width]);
    let mut grad_head = want_head.then(|| vec![0f32; width * vocab]);
    let upstream = super::linear::loss_only_upstream(chunk_rows);
    let mut sum = 0f64;
    for start in (0..rows).step_by(chunk_rows) {
        let range = start..(start + chunk_rows).min(rows);
        let (h, r) = (hidden.row_range(range.clone()), range.len());
        let logits = &mut block[..r * vocab];
        matmul(logits, h, head, false);
        let stats = if want_hidden || want_head {
            host::stats_and_grad_in_place(logits, vocab, &labels[range.clone()], &upstream)
        } else {
            host::stats(logits, vocab, &labels[range.clone()])
        };
        sum += stats.chunks_exact(2).map(|s| s[0] as f64).sum::<f64>();
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
    fn strided_operands_multiply_as_dense_ones() {
        // lhs 2 × 3, rhs given as the transpose of a 2 × 3 buffer (strides 1, 3).
        let lhs = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let rhs_t = [1.0, 0.0, -1.0, 2.0, 1.0, 0.5];
        let mut dst = [0.0; 4];
        let rhs = Matrix::dense(&rhs_t, 2, 3).t();
        matmul(&mut dst, Matrix::dense(&lhs, 2, 3), rhs, false);
        assert_eq!(dst, [-2.0, 5.5, -2.0, 16.0]);
        matmul(&mut dst, Matrix::dense(&lhs, 2, 3), rhs, true);
        assert_eq!(dst, [-4.0, 11.0, -4.0, 32.0]);
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
