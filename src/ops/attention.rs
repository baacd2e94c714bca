//! Causal self-attention as one operation: softmax(q·kᵀ/√d + causal mask)·v, with a
//! hand-written backward on the CPU.
//!
//! Composed of burn ops, attention keeps its `[batch, heads, len, len]` probabilities for the
//! backward and runs the mask, the softmax and their gradients as separate passes over them
//! (with the matmuls over the masked half included): most of a `125m` CPU step outside the
//! layers' matmuls. The CPU kernel here takes one head and one block of query rows at a time, in
//! a buffer that stays in cache, reads only the keys a block can see, and its backward
//! recomputes the probabilities from q and k rather than keeping them, as FlashAttention does.
//! Other backends run the composed ops, which burn's autodiff differentiates as before: a GPU
//! step is matmul-bound, and the recomputation would add a matmul.

use std::any::TypeId;
use std::ops::Range;

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::wgpu::CubeBackend;
use burn::backend::{Backend, Dispatch, Flex, Scalar, TensorMetadata, backend_extension};
use burn::tensor::{DType, Shape, Tensor, TensorData};
use rayon::prelude::*;

use crate::ops::gemm::{Matrix, contiguous, matmul_here};
use crate::ops::lanes;

/// `q, k, v: [batch, heads, len, head_dim]`, keys and values already repeated for each query
/// head → `[batch, heads, len, head_dim]`. Position i attends to the positions j ≤ i, and with
/// a sliding `window` only to those with i − j < window.
pub fn causal(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, window: Option<usize>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as AttentionBackend>::ual_causal_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        window.unwrap_or(usize::MAX),
    ))
}

/// The gradients of Σ grad·[`causal`]`(q, k, v)` with respect to q, k and v, without autodiff:
/// the CPU kernel's backward on the CPU, the composed ops elsewhere.
pub fn causal_backward(
    [q, k, v]: [Tensor<4>; 3],
    grad: Tensor<4>,
    window: Option<usize>,
) -> [Tensor<4>; 3] {
    let (dq, dk, dv) = <Dispatch as AttentionBackend>::ual_causal_attention_backward(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        grad.into_dispatch(),
        window.unwrap_or(usize::MAX),
    );
    [dq, dk, dv].map(Tensor::from_dispatch)
}

/// Causal attention as a backend operation, so that the CPU runs its own kernel and autodiff a hand-written backward.
#[backend_extension(Autodiff, Cube, Flex, Fusion)]
pub trait AttentionBackend: Backend {
    /// [`causal`] on primitives; `window` is `usize::MAX` for none.
    #[fusion(default)]
    fn ual_causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        window: usize,
    ) -> FloatTensor<Self> {
        composed::forward::<Self>(q, k, v, window)
    }

    /// [`causal_backward`] on primitives: `(grad q, grad k, grad v)`.
    #[fusion(default)]
    fn ual_causal_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        window: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        composed::backward::<Self>(q, k, v, grad, window)
    }
}

impl AttentionBackend for CubeBackend {}

impl AttentionBackend for Flex {
    fn ual_causal_attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        window: usize,
    ) -> FlexTensor {
        let Some(heads) = Heads::of([&q, &k, &v], window) else {
            return composed::forward::<Self>(q, k, v, window);
        };
        let [q, k, v] = [q, k, v].map(contiguous);
        heads.tensor(cpu::forward(
            values(&q),
            values(&k),
            values(&v),
            heads.geometry,
        ))
    }

    fn ual_causal_attention_backward(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        grad: FlexTensor,
        window: usize,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let Some(heads) = Heads::of([&q, &k, &v], window).filter(|_| is_f32(&grad)) else {
            return composed::backward::<Self>(q, k, v, grad, window);
        };
        let [q, k, v, grad] = [q, k, v, grad].map(contiguous);
        let [q, k, v, grad] = [&q, &k, &v, &grad].map(values);
        let [dq, dk, dv] = cpu::backward(q, k, v, grad, heads.geometry);
        (heads.tensor(dq), heads.tensor(dk), heads.tensor(dv))
    }
}

impl<B: AttentionBackend, C: CheckpointStrategy> AttentionBackend for Autodiff<B, C> {
    fn ual_causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        window: usize,
    ) -> FloatTensor<Self> {
        // Only the CPU kernel's backward beats autodiff through the composed ops.
        if TypeId::of::<B>() != TypeId::of::<Flex>() {
            return composed::forward::<Self>(q, k, v, window);
        }

        #[derive(Debug)]
        struct AttentionGrads {
            window: usize,
        }

        impl<B: AttentionBackend> Backward<B, 3> for AttentionGrads {
            type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let grad = grads.consume::<B>(&ops.node);
                let (q, k, v) = ops.state;
                let (dq, dk, dv) = B::ual_causal_attention_backward(q, k, v, grad, self.window);
                for (node, grad) in ops.parents.into_iter().zip([dq, dk, dv]) {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        let (q, q_node) = q.into_parts();
        let (k, k_node) = k.into_parts();
        let (v, v_node) = v.into_parts();
        let node = AttentionGrads { window };
        match node
            .prepare::<C>([q_node, k_node, v_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::ual_causal_attention(q.clone(), k.clone(), v.clone(), window);
                prep.finish((q, k, v), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::ual_causal_attention(q, k, v, window)),
        }
    }
}

/// Attention in burn ops, for every backend: the reference the CPU kernel is tested against, and
/// what GPUs run.
pub mod composed {
    use super::*;

    /// softmax(q·kᵀ/√d + mask)·v.
    pub fn forward<B: Backend>(
        q: FloatTensor<B>,
        k: FloatTensor<B>,
        v: FloatTensor<B>,
        window: usize,
    ) -> FloatTensor<B> {
        B::float_matmul(probabilities::<B>(q, k, window), v)
    }

    /// The gradients of Σ grad·[`forward`], the probabilities recomputed from q and k.
    pub fn backward<B: Backend>(
        q: FloatTensor<B>,
        k: FloatTensor<B>,
        v: FloatTensor<B>,
        grad: FloatTensor<B>,
        window: usize,
    ) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
        let scale = scale_of(&q.shape());
        let p = probabilities::<B>(q.clone(), k.clone(), window);
        let grad_v = B::float_matmul(B::float_swap_dims(p.clone(), 2, 3), grad.clone());
        let grad_p = B::float_matmul(grad, B::float_swap_dims(v, 2, 3));
        // The softmax's backward: p · (grad p − Σ p · grad p), times the scores' scale.
        let shift = B::float_sum_dim(B::float_mul(p.clone(), grad_p.clone()), 3);
        let grad_scores = B::float_mul(p, B::float_sub(grad_p, shift));
        let grad_scores = B::float_mul_scalar(grad_scores, Scalar::Float(scale));
        let grad_q = B::float_matmul(grad_scores.clone(), k);
        let grad_k = B::float_matmul(B::float_swap_dims(grad_scores, 2, 3), q);
        (grad_q, grad_k, grad_v)
    }

    fn probabilities<B: Backend>(
        q: FloatTensor<B>,
        k: FloatTensor<B>,
        window: usize,
    ) -> FloatTensor<B> {
        let len = q.shape()[2];
        let scale = scale_of(&q.shape());
        let mask = B::float_from_data(additive_mask(len, window), &q.device());
        let scores = B::float_matmul(q, B::float_swap_dims(k, 2, 3));
        let scores = B::float_add(B::float_mul_scalar(scores, Scalar::Float(scale)), mask);
        B::softmax(scores, 3)
    }

    /// `[1, 1, len, len]`: 0 where a query sees a key, a large negative number elsewhere (not
    /// −∞, so that nothing turns into NaN).
    fn additive_mask(len: usize, window: usize) -> TensorData {
        let values = (0..len)
            .flat_map(|i| (0..len).map(move |j| if sees(i, j, window) { 0.0 } else { -1e30f32 }))
            .collect::<Vec<_>>();
        TensorData::new(values, [1, 1, len, len])
    }

    fn scale_of(shape: &Shape) -> f64 {
        (shape[3] as f64).powf(-0.5)
    }
}

/// Whether query `i` sees key `j`.
fn sees(i: usize, j: usize, window: usize) -> bool {
    j <= i && i - j < window
}

/// The CPU kernel's view of a call: f32 heads, one after another, each `len × dim` row-major.
struct Heads {
    shape: [usize; 4],
    geometry: Geometry,
}

impl Heads {
    /// `None` unless q, k and v are f32 of one `[batch, heads, len, dim]` shape.
    fn of(tensors: [&FlexTensor; 3], window: usize) -> Option<Self> {
        let shape = tensors[0].shape();
        let same = tensors
            .iter()
            .all(|t| is_f32(t) && t.shape() == shape && shape.num_dims() == 4);
        same.then(|| Self {
            shape: [shape[0], shape[1], shape[2], shape[3]],
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

/// The CPU kernel: heads in parallel, one block of query rows at a time within a head.
mod cpu {
    use super::*;

    /// softmax(q·kᵀ/√d + mask)·v for every head.
    pub fn forward(q: &[f32], k: &[f32], v: &[f32], g: Geometry) -> Vec<f32> {
        let mut out = vec![0f32; q.len()];
        out.par_chunks_mut(g.head_size())
            .enumerate()
            .for_each(|(h, out)| {
                let [q, k, v] = [q, k, v].map(|x| head(x, h, g));
                let mut scores = vec![0f32; BLOCK_ROWS * g.len];
                for rows in g.row_blocks() {
                    let keys = g.keys_of(&rows);
                    let p = probabilities(&mut scores, q, k, &rows, &keys, g);
                    let p = Matrix::dense(p, rows.len(), keys.len());
                    let out = &mut out[rows.start * g.dim..rows.end * g.dim];
                    matmul_here(out, p, v.row_range(keys), false);
                }
            });
        out
    }

    /// `[grad q, grad k, grad v]` of Σ grad·[`forward`], each block's probabilities recomputed.
    pub fn backward(q: &[f32], k: &[f32], v: &[f32], grad: &[f32], g: Geometry) -> [Vec<f32>; 3] {
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
                for rows in g.row_blocks() {
                    let keys = g.keys_of(&rows);
                    let (r, width) = (rows.len(), keys.len());
                    let p = probabilities(&mut scores, q, k, &rows, &keys, g);
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
    /// returned as `rows × keys` row-major; entries a row does not see are 0.
    fn probabilities<'a>(
        scores: &'a mut [f32],
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
        for (i, row) in rows.clone().zip(p.chunks_exact_mut(width)) {
            let seen = g.visible(i, keys);
            row[..seen.start].fill(0.0);
            row[seen.end..].fill(0.0);
            let row = &mut row[seen];
            let max = lanes::row_max(row);
            let sum = lanes::exp_in_place(row, max, g.scale());
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
