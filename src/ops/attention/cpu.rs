//! The CPU kernel: heads in parallel, one block of query rows at a time within a head, in a
//! buffer that stays in cache, reading only the keys a block can see; its backward recomputes
//! the probabilities from q and k rather than keeping them, as FlashAttention does.
//!
//! Composed of burn ops, attention keeps its `[batch, heads, len, len]` probabilities for the
//! backward and runs the mask, the softmax and their gradients as separate passes over them
//! (with the matmuls over the masked half included): most of a `125m` CPU step outside the
//! layers' matmuls.

use std::ops::Range;

use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Flex, TensorMetadata};
use burn::tensor::{DType, FloatDType, TensorData};
use rayon::prelude::*;

use super::{AttentionBackend, composed, grouped, lse_shape};
use crate::ops::gemm::{Matrix, contiguous, matmul_here};
use crate::ops::lanes;

impl AttentionBackend for Flex {
    fn ual_causal_attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        window: usize,
    ) -> (FlexTensor, FlexTensor) {
        if let Some(dtype) = half(&q) {
            // The CPU has no half arithmetic to gain from: the kernel runs in f32.
            let [q, k, v] = [q, k, v].map(widen);
            let (out, lse) = Self::ual_causal_attention(q, k, v, window);
            return (cast::<Self>(out, dtype), lse);
        }
        let Some(heads) = Heads::of([&q, &k, &v], window) else {
            return composed::forward::<Self>(q, k, v, window);
        };
        let [k, v] = [k, v].map(|t| composed::repeat_kv::<Self>(t, heads.group));
        let [q, k, v] = [q, k, v].map(contiguous);
        let (out, lse) = forward(values(&q), values(&k), values(&v), heads.geometry);
        let lse = FlexTensor::from_data(TensorData::new(lse, lse_shape(&q.shape())));
        (heads.tensor(out), lse)
    }

    /// The probabilities are recomputed from q and k, so the output and log-sum-exp go unused.
    fn ual_causal_attention_backward(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        _out: FlexTensor,
        _lse: FlexTensor,
        grad: FlexTensor,
        window: usize,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let Some(dtype) = half(&q) else {
            return backward_f32(q, k, v, grad, window);
        };
        let [q, k, v, grad] = [q, k, v, grad].map(widen);
        let (dq, dk, dv) = backward_f32(q, k, v, grad, window);
        let narrow = |t| cast::<Flex>(t, dtype);
        (narrow(dq), narrow(dk), narrow(dv))
    }
}

/// The backward on f32 primitives: the kernel where it applies, the composed ops otherwise.
fn backward_f32(
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    grad: FlexTensor,
    window: usize,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let Some(heads) = Heads::of([&q, &k, &v], window).filter(|_| is_f32(&grad)) else {
        return composed::backward::<Flex>(q, k, v, grad, window);
    };
    let [k, v] = [k, v].map(|t| composed::repeat_kv::<Flex>(t, heads.group));
    let [q, k, v, grad] = [q, k, v, grad].map(contiguous);
    let [q, k, v, grad] = [&q, &k, &v, &grad].map(values);
    let [dq, dk, dv] = backward(q, k, v, grad, heads.geometry);
    let [dk, dv] = [dk, dv].map(|t| composed::sum_groups::<Flex>(heads.tensor(t), heads.group));
    (heads.tensor(dq), dk, dv)
}

/// The CPU kernel's view of a call: f32 heads, one after another, each `len × dim` row-major.
struct Heads {
    shape: [usize; 4],
    /// Query heads per key/value head; the kernel reads keys and values repeated.
    group: usize,
    geometry: Geometry,
}

impl Heads {
    /// `None` unless q, k and v are f32 `[batch, heads, len, dim]`, k and v of one shape with a
    /// head count that divides q's.
    fn of([q, k, v]: [&FlexTensor; 3], window: usize) -> Option<Self> {
        let shape = q.shape();
        let group = grouped(&shape, &k.shape(), &v.shape())?;
        let fits = [q, k, v].iter().all(|t| is_f32(t));
        fits.then(|| Self {
            shape: [shape[0], shape[1], shape[2], shape[3]],
            group,
            geometry: Geometry {
                len: shape[2],
                dim: shape[3],
                window,
            },
        })
    }

    fn tensor(&self, values: Vec<f32>) -> FlexTensor {
        FlexTensor::from_data(TensorData::new(values, self.shape))
    }
}

/// The half type of a half-precision tensor.
fn half(t: &FlexTensor) -> Option<FloatDType> {
    matches!(t.dtype(), DType::F16 | DType::BF16).then(|| t.dtype().into())
}

fn cast<B: Backend>(t: FloatTensor<B>, dtype: FloatDType) -> FloatTensor<B> {
    B::float_cast(t, dtype)
}

fn widen(t: FlexTensor) -> FlexTensor {
    cast::<Flex>(t, FloatDType::F32)
}

fn is_f32(t: &FlexTensor) -> bool {
    t.dtype() == DType::F32
}

/// A contiguous f32 tensor's values.
fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32")
}

/// One head's sequence length, width and sliding window (`usize::MAX`: none).
#[derive(Clone, Copy, Debug)]
struct Geometry {
    len: usize,
    dim: usize,
    window: usize,
}

/// Query rows per block: 64 rows of scores over 512 keys is 128 KiB, which stays in L2.
const BLOCK_ROWS: usize = 64;

impl Geometry {
    fn row_blocks(self) -> impl Iterator<Item = Range<usize>> {
        (0..self.len)
            .step_by(BLOCK_ROWS)
            .map(move |start| start..(start + BLOCK_ROWS).min(self.len))
    }

    /// The keys some row of `rows` sees: from the first row's earliest key to the last row.
    fn keys_of(self, rows: &Range<usize>) -> Range<usize> {
        (rows.start + 1).saturating_sub(self.window)..rows.end
    }

    /// The columns of `keys` that query `i` sees.
    fn visible(self, i: usize, keys: &Range<usize>) -> Range<usize> {
        let first = (i + 1).saturating_sub(self.window).max(keys.start);
        first - keys.start..i + 1 - keys.start
    }

    fn scale(self) -> f32 {
        (self.dim as f32).powf(-0.5)
    }

    fn head_size(self) -> usize {
        self.len * self.dim
    }
}

/// softmax(q·kᵀ/√d + mask)·v for every head, and every row's log-sum-exp.
fn forward(q: &[f32], k: &[f32], v: &[f32], g: Geometry) -> (Vec<f32>, Vec<f32>) {
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![0f32; q.len() / g.dim];
    out.par_chunks_mut(g.head_size())
        .zip(lse.par_chunks_mut(g.len))
        .enumerate()
        .for_each(|(h, (out, lse))| {
            let [q, k, v] = [q, k, v].map(|x| head(x, h, g));
            let mut scores = vec![0f32; BLOCK_ROWS * g.len];
            for rows in g.row_blocks() {
                let keys = g.keys_of(&rows);
                let lse = &mut lse[rows.clone()];
                let p = probabilities(&mut scores, lse, q, k, &rows, &keys, g);
                let p = Matrix::dense(p, rows.len(), keys.len());
                let out = &mut out[rows.start * g.dim..rows.end * g.dim];
                matmul_here(out, p, v.row_range(keys), false);
            }
        });
    (out, lse)
}

/// `[grad q, grad k, grad v]` of Σ grad·[`forward`], each block's probabilities recomputed.
fn backward(q: &[f32], k: &[f32], v: &[f32], grad: &[f32], g: Geometry) -> [Vec<f32>; 3] {
    let [mut dq, mut dk, mut dv] = [(); 3].map(|_| vec![0f32; q.len()]);
    let size = g.head_size();
    dq.par_chunks_mut(size)
        .zip(dk.par_chunks_mut(size))
        .zip(dv.par_chunks_mut(size))
        .enumerate()
        .for_each(|(h, ((dq, dk), dv))| {
            let [q, k, v, grad] = [q, k, v, grad].map(|x| head(x, h, g));
            let mut scores = vec![0f32; BLOCK_ROWS * g.len];
            let mut grad_scores = vec![0f32; BLOCK_ROWS * g.len];
            let mut lse = [0f32; BLOCK_ROWS];
            for rows in g.row_blocks() {
                let keys = g.keys_of(&rows);
                let (r, width) = (rows.len(), keys.len());
                let lse = &mut lse[..r];
                let p = probabilities(&mut scores, lse, q, k, &rows, &keys, g);
                let ds = &mut grad_scores[..r * width];
                // grad p = grad·vᵀ, then the softmax's backward in place, row by row.
                matmul_here(
                    ds,
                    grad.row_range(rows.clone()),
                    v.row_range(keys.clone()).t(),
                    false,
                );
                for (ds, p) in ds.chunks_exact_mut(width).zip(p.chunks_exact(width)) {
                    let shift = lanes::dot(p, ds) as f32;
                    lanes::softmax_grad_in_place(ds, p, shift, g.scale());
                }
                let (p, ds) = (Matrix::dense(p, r, width), Matrix::dense(ds, r, width));
                let (row_span, key_span) = (span(&rows, g), span(&keys, g));
                matmul_here(&mut dq[row_span], ds, k.row_range(keys.clone()), false);
                matmul_here(
                    &mut dk[key_span.clone()],
                    ds.t(),
                    q.row_range(rows.clone()),
                    true,
                );
                matmul_here(&mut dv[key_span], p.t(), grad.row_range(rows), true);
            }
        });
    [dq, dk, dv]
}

/// The softmax of one block's scores over the keys it sees, written into `scores` and
/// returned as `rows × keys` row-major (entries a row does not see are 0), with each row's
/// log-sum-exp in `lse`.
fn probabilities<'a>(
    scores: &'a mut [f32],
    lse: &mut [f32],
    q: Matrix,
    k: Matrix,
    rows: &Range<usize>,
    keys: &Range<usize>,
    g: Geometry,
) -> &'a [f32] {
    let width = keys.len();
    let p = &mut scores[..rows.len() * width];
    matmul_here(
        p,
        q.row_range(rows.clone()),
        k.row_range(keys.clone()).t(),
        false,
    );
    for ((i, row), lse) in rows.clone().zip(p.chunks_exact_mut(width)).zip(lse) {
        let seen = g.visible(i, keys);
        row[..seen.start].fill(0.0);
        row[seen.end..].fill(0.0);
        let row = &mut row[seen];
        let max = lanes::row_max(row);
        let sum = lanes::exp_in_place(row, max, g.scale());
        *lse = max * g.scale() + sum.ln() as f32;
        lanes::scale_in_place(row, (1.0 / sum) as f32);
    }
    p
}

/// Head `h` of `x` as a `len × dim` matrix.
fn head(x: &[f32], h: usize, g: Geometry) -> Matrix<'_> {
    let size = g.head_size();
    Matrix::dense(&x[h * size..(h + 1) * size], g.len, g.dim)
}

/// The values of positions `range` within one head's `len × dim` buffer.
fn span(range: &Range<usize>, g: Geometry) -> Range<usize> {
    range.start * g.dim..range.end * g.dim
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_read_only_the_keys_they_see() {
        let g = Geometry {
            len: 150,
            dim: 4,
            window: usize::MAX,
        };
        let blocks: Vec<_> = g.row_blocks().collect();
        assert_eq!(blocks, [0..64, 64..128, 128..150]);
        assert_eq!(g.keys_of(&(64..128)), 0..128);
        assert_eq!(g.visible(70, &(0..128)), 0..71);
        let windowed = Geometry { window: 20, ..g };
        assert_eq!(windowed.keys_of(&(64..128)), 45..128);
        // Query 70 sees keys 51..=70: columns 6..26 of keys 45..128.
        assert_eq!(windowed.visible(70, &(45..128)), 6..26);
        assert_eq!(windowed.keys_of(&(0..64)), 0..64);
        assert_eq!(windowed.visible(3, &(0..64)), 0..4);
    }
}
