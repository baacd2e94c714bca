//! Causal self-attention as one operation, softmax(q·kᵀ/√d + causal mask)·v, with a
//! hand-written backward that recomputes the probabilities from the rows' saved log-sum-exp
//! rather than keeping them, as FlashAttention does.
//!
//! Keys and values come with their own head count (grouped-query attention); the kernels read
//! each key/value head for all the query heads that share it, and never see a repeated copy.
//! - On the CPU, a kernel that takes one head and one block of query rows at a time (`cpu`).
//! - On wgpu, the WGSL kernels of `shaders/ual_attention_*.wgsl` (`cube`): keys streamed through
//!   workgroup memory with an online softmax, so memory grows linearly in the sequence length.
//! - Elsewhere, and for element types the kernels do not take, burn ops (`composed`).

mod cpu;
mod cube;

pub mod composed;

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{AutodiffBackend, Backend, Dispatch, backend_extension};
use burn::tensor::{DType, Shape, Tensor};

/// `q: [batch, heads, len, head_dim]`, `k, v: [batch, kv_heads, len, head_dim]` with `kv_heads`
/// dividing `heads` → `[batch, heads, len, head_dim]`. Query head h reads key/value head
/// h / (heads / kv_heads). Position i attends to the positions j ≤ i, and with a sliding
/// `window` only to those with i − j < window.
pub fn causal(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, window: Option<usize>) -> Tensor<4> {
    let (out, _lse) = <Dispatch as AttentionBackend>::ual_causal_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        window_of(window),
    );
    Tensor::from_dispatch(out)
}

/// The gradients of Σ grad·[`causal`]`(q, k, v)` with respect to q, k and v, without autodiff:
/// the backward of whichever kernel the device runs.
pub fn causal_backward(
    [q, k, v]: [Tensor<4>; 3],
    grad: Tensor<4>,
    window: Option<usize>,
) -> [Tensor<4>; 3] {
    let window = window_of(window);
    let [q, k, v] = [q, k, v].map(Tensor::into_dispatch);
    let (out, lse) = <Dispatch as AttentionBackend>::ual_causal_attention(
        q.clone(),
        k.clone(),
        v.clone(),
        window,
    );
    let (dq, dk, dv) = <Dispatch as AttentionBackend>::ual_causal_attention_backward(
        q,
        k,
        v,
        out,
        lse,
        grad.into_dispatch(),
        window,
    );
    [dq, dk, dv].map(Tensor::from_dispatch)
}

/// [`causal`] composed of burn ops and differentiated by burn's autodiff, as attention ran before
/// its kernels: what `ual bench attention` compares them with.
pub fn causal_composed(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    window: Option<usize>,
) -> Tensor<4> {
    let (out, _lse) = composed::forward::<Dispatch>(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        window_of(window),
    );
    Tensor::from_dispatch(out)
}

fn window_of(window: Option<usize>) -> usize {
    window.unwrap_or(usize::MAX)
}

/// Whether query `i` sees key `j`.
fn sees(i: usize, j: usize, window: usize) -> bool {
    j <= i && i - j < window
}

/// Query heads per key/value head, where q is `[b, h, len, d]` and k and v are both
/// `[b, kv, len, d]` with kv dividing h: the shapes every kernel takes.
fn grouped(q: &Shape, k: &Shape, v: &Shape) -> Option<usize> {
    let fits = q.num_dims() == 4
        && k == v
        && k.num_dims() == 4
        && [0, 2, 3].iter().all(|&d| k[d] == q[d])
        && k[1] > 0
        && q[1].is_multiple_of(k[1]);
    fits.then(|| q[1] / k[1])
}

/// The shape of the rows' log-sum-exp for queries of `shape`: `[batch, heads, len]`.
pub fn lse_shape(shape: &Shape) -> Shape {
    Shape::new([shape[0], shape[1], shape[2]])
}

/// Causal attention as backend operations, so that each device runs its own kernel and autodiff
/// the hand-written backward.
#[backend_extension(Autodiff, Cube, Flex, Fusion)]
pub trait AttentionBackend: Backend {
    /// [`causal`] on primitives, `window` `usize::MAX` for none → the output and the rows'
    /// log-sum-exp `[batch, heads, len]` in f32.
    #[fusion(meta = |q, _k, _v, _window| (
        q.clone(),
        burn::backend::fusion::custom::TensorSpec::new(lse_shape(&q.shape), DType::F32),
    ))]
    fn ual_causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        window: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composed::forward::<Self>(q, k, v, window)
    }

    /// [`causal_backward`] on primitives, given the forward's output and log-sum-exp:
    /// `(grad q, grad k, grad v)`, k's and v's with their own head count.
    #[fusion(meta = |q, k, v, _out, _lse, _grad, _window| (q.clone(), k.clone(), v.clone()))]
    fn ual_causal_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        window: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let _ = (out, lse);
        composed::backward::<Self>(q, k, v, grad, window)
    }
}

impl<B: AttentionBackend, C: CheckpointStrategy> AttentionBackend for Autodiff<B, C> {
    fn ual_causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        window: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        #[derive(Debug)]
        struct AttentionGrads {
            window: usize,
        }

        impl<B: AttentionBackend> Backward<B, 3> for AttentionGrads {
            /// q, k, v, the output and the log-sum-exp: O(len) each, never O(len²).
            type State = [FloatTensor<B>; 5];

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let grad = grads.consume::<B>(&ops.node);
                let [q, k, v, out, lse] = ops.state;
                let (dq, dk, dv) =
                    B::ual_causal_attention_backward(q, k, v, out, lse, grad, self.window);
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
        let (out, lse) = B::ual_causal_attention(q.clone(), k.clone(), v.clone(), window);
        let untracked_lse = Self::from_inner(lse.clone());
        let node = AttentionGrads { window };
        let out = match node
            .prepare::<C>([q_node, k_node, v_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish([q, k, v, out.clone(), lse], out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        (out, untracked_lse)
    }
}
