//! Strided f32 matrices inside flex's buffers, multiplied by gemm directly.
//!
//! burn-flex's own matmul is gemm too, but every tensor it returns is allocated twice (a zeroed
//! byte vector, then an aligned copy of it). The CPU kernels that are the product (the fused
//! head, attention) keep their blocks in buffers of their own and call gemm on views of them;
//! this module is the one place that does, with the bounds checked before the call.

use std::ops::Range;

use burn::backend::flex::FlexTensor;
use burn::tensor::DType;

/// `t` itself when its values are one contiguous run of its buffer, else a contiguous copy:
/// the kernels read a tensor's values as one slice.
pub fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.layout().contiguous_offsets().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// A strided f32 matrix inside a buffer: element (i, j) is `data[offset + i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    data: &'a [f32],
    offset: usize,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    rs: isize,
    cs: isize,
}

impl<'a> Matrix<'a> {
    /// A 2-D f32 tensor with non-negative strides, as flex stores it.
    pub fn of(t: &'a FlexTensor) -> Option<Self> {
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
    pub fn dense(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            offset: 0,
            rows,
            cols,
            rs: cols as isize,
            cs: 1,
        }
    }

    /// The transpose (a view).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Rows `range` (a view).
    pub fn row_range(self, range: Range<usize>) -> Self {
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
pub fn matmul(dst: &mut [f32], lhs: Matrix, rhs: Matrix, accumulate: bool) {
    // As burn-flex decides: threads only where the product is worth them.
    let threads = lhs.rows * lhs.cols * rhs.cols >= 1 << 18;
    gemm_into(dst, lhs, rhs, accumulate, threads);
}

/// [`matmul`] on the calling thread, for callers that already run one task per core.
pub fn matmul_here(dst: &mut [f32], lhs: Matrix, rhs: Matrix, accumulate: bool) {
    gemm_into(dst, lhs, rhs, accumulate, false);
}

fn gemm_into(dst: &mut [f32], lhs: Matrix, rhs: Matrix, accumulate: bool, threads: bool) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert!(rhs.rows == k && dst.len() == m * n, "matmul shapes");
    assert!(
        lhs.in_bounds() && rhs.in_bounds(),
        "matmul operands in bounds"
    );
    let parallelism = if threads {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
