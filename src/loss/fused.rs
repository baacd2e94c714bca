//! The fused UAL loss as a burn backend extension.
//!
//! Two operations make the loss: `ual_ce_forward` reads each logits row once and returns
//! `[rows, 2]` statistics (loss, lse); `ual_ce_backward` writes softmax − q into the gradient
//! from the saved lse. On wgpu they are the WGSL kernels of `shaders/`; elsewhere the
//! row-parallel host loop of `super::host`, with the same arithmetic. Autodiff gets a
//! hand-written backward that keeps only the logits handle and the `[rows, 2]` statistics,
//! never a softmax. The fused head is an operation too (`ual_linear_ce_grads`), so that the CPU
//! can run it on gemm directly (`super::cpu_head`).

use burn::backend::TensorMetadata;
use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, Flex, backend_extension};
use burn::tensor::{DType, Shape, Tensor, TensorData};

use super::{cpu_head, host};
use crate::matmul::contiguous;

/// The shape of the per-row statistics: `[rows, 2]`.
pub fn stats_shape(logits: &Shape) -> Shape {
    Shape::new([logits[0], 2])
}

/// The shape of a gradient written slice-major: `[slices, rows, V / slices]`.
pub fn sliced_shape(logits: &Shape, slices: &usize) -> Shape {
    Shape::new([*slices, logits[0], logits[1] / slices])
}

/// A `[rows, V]` gradient seen slice-major (a view; the matmul that reads it makes the copy).
pub(super) fn slice_major<B: Backend>(grad: FloatTensor<B>, slices: usize) -> FloatTensor<B> {
    let [rows, vocab] = [grad.shape()[0], grad.shape()[1]];
    let grad = B::float_reshape(grad, Shape::new([rows, slices, vocab / slices]));
    B::float_swap_dims(grad, 0, 1)
}

#[backend_extension(Autodiff, Cube, Flex, Fusion)]
pub trait UalLossBackend: Backend {
    /// `[rows, V]` logits and `[rows, 3]` (target, ε, mask) labels → `[rows, 2]` f32 (loss, lse).
    #[fusion(dtype = DType::F32, shape = stats_shape(logits))]
    fn ual_ce_forward(logits: FloatTensor<Self>, labels: FloatTensor<Self>) -> FloatTensor<Self> {
        host::forward::<Self>(logits, labels)
    }

    /// The gradient of the statistics' upstream gradient `[rows, 2]` with respect to the logits.
    #[fusion(dtype = logits, shape = logits)]
    fn ual_ce_backward(
        logits: FloatTensor<Self>,
        labels: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        grad_stats: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        host::backward::<Self>(logits, labels, stats, grad_stats)
    }

    /// [`Self::ual_ce_backward`] written slice-major, `[slices, rows, V / slices]`: slice `s`
    /// holds columns `s·V/S .. (s+1)·V/S` of every row, the layout a batched matmul over slices
    /// of the vocabulary reads without a copy (`super::linear`). `slices` divides V.
    #[fusion(dtype = logits, shape = sliced_shape(logits, slices))]
    fn ual_ce_backward_sliced(
        logits: FloatTensor<Self>,
        labels: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        grad_stats: FloatTensor<Self>,
        slices: usize,
    ) -> FloatTensor<Self> {
        slice_major::<Self>(
            Self::ual_ce_backward(logits, labels, stats, grad_stats),
            slices,
        )
    }

    /// `[rows, H]` hidden states, a `[H, V]` head and `[rows, 3]` labels → the `[1]` loss
    /// summed over counted rows, the head applied `chunk_rows` rows at a time (`super::linear`);
    /// under autodiff the hidden gradient is formed over `vocab_splits` slices of the vocabulary.
    #[fusion(default)]
    fn ual_linear_ce_sum(
        hidden: FloatTensor<Self>,
        head: FloatTensor<Self>,
        labels: FloatTensor<Self>,
        chunk_rows: usize,
        vocab_splits: usize,
    ) -> FloatTensor<Self> {
        let parts =
            Self::ual_linear_ce_grads(hidden, head, labels, chunk_rows, vocab_splits, false, false);
        parts.0
    }

    /// The summed loss of [`Self::ual_linear_ce_sum`] with the gradients of that sum with
    /// respect to the hidden states and the head, each formed only where asked: `(sum,
    /// hidden gradient, head gradient)`.
    #[fusion(default)]
    fn ual_linear_ce_grads(
        hidden: FloatTensor<Self>,
        head: FloatTensor<Self>,
        labels: FloatTensor<Self>,
        chunk_rows: usize,
        vocab_splits: usize,
        want_hidden: bool,
        want_head: bool,
    ) -> (
        FloatTensor<Self>,
        Option<FloatTensor<Self>>,
        Option<FloatTensor<Self>>,
    ) {
        let blocks = super::linear::HeadBlocks {
            rows: chunk_rows,
            vocab_splits,
        };
        super::linear::chunked::<Self>(hidden, head, labels, blocks, want_hidden, want_head)
    }
}

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

    /// Unsplit heads take `super::cpu_head`: one block buffer for the whole call. A split asked
    /// for on the CPU (it is a GPU occupancy measure) keeps the generic blocks, as elsewhere.
    fn ual_linear_ce_grads(
        hidden: FloatTensor<Self>,
        head: FloatTensor<Self>,
        labels: FloatTensor<Self>,
        chunk_rows: usize,
        vocab_splits: usize,
        want_hidden: bool,
        want_head: bool,
    ) -> (
        FloatTensor<Self>,
        Option<FloatTensor<Self>>,
        Option<FloatTensor<Self>>,
    ) {
        if vocab_splits == 1
            && let Some(parts) =
                cpu_head::fused(&hidden, &head, &labels, chunk_rows, want_hidden, want_head)
        {
            return parts;
        }
        let blocks = super::linear::HeadBlocks {
            rows: chunk_rows,
            vocab_splits,
        };
        super::linear::chunked::<Self>(hidden, head, labels, blocks, want_hidden, want_head)
    }
}

/// `t` as a contiguous f32 tensor, or `t` back unchanged when it holds another dtype.
fn f32_contiguous(t: FlexTensor) -> Result<FlexTensor, FlexTensor> {
    if t.dtype() != DType::F32 {
        return Err(t);
    }
    Ok(contiguous(t))
}

impl<B: UalLossBackend, C: CheckpointStrategy> UalLossBackend for Autodiff<B, C> {
    fn ual_ce_forward(logits: FloatTensor<Self>, labels: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct UalCeBackward;

        impl<B: UalLossBackend> Backward<B, 1> for UalCeBackward {
            type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [logits_node] = ops.parents;
                let grad_stats = grads.consume::<B>(&ops.node);
                let (logits, labels, stats) = ops.state;
                if let Some(node) = logits_node {
                    grads.register::<B>(
                        node.id,
                        B::ual_ce_backward(logits, labels, stats, grad_stats),
                    );
                }
            }
        }

        let (logits, logits_node) = logits.into_parts();
        let (labels, _) = labels.into_parts();
        let stats = B::ual_ce_forward(logits.clone(), labels.clone());
        match UalCeBackward
            .prepare::<C>([logits_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((logits, labels, stats.clone()), stats),
            OpsKind::UnTracked(prep) => prep.finish(stats),
        }
    }

    fn ual_linear_ce_sum(
        hidden: FloatTensor<Self>,
        head: FloatTensor<Self>,
        labels: FloatTensor<Self>,
        chunk_rows: usize,
        vocab_splits: usize,
    ) -> FloatTensor<Self> {
        let blocks = super::linear::HeadBlocks {
            rows: chunk_rows,
            vocab_splits,
        };
        super::linear::autodiff_loss_sum::<B, C>(hidden, head, labels, blocks)
    }
}

/// Per-row UAL loss `[rows]` from logits `[rows, V]` and packed labels `[rows, 3]`.
pub fn row_losses(logits: Tensor<2>, labels: Tensor<2>) -> Tensor<1> {
    let [rows, _] = logits.dims();
    let stats: Tensor<2> = Tensor::from_dispatch(<Dispatch as UalLossBackend>::ual_ce_forward(
        logits.into_dispatch(),
        labels.into_dispatch(),
    ));
    stats.narrow(1, 0, 1).reshape([rows])
}
