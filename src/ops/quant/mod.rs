//! Quantized frozen projections (QLoRA's base): llama.cpp's Q8_0 and Q4_0 blocks (`blocks`),
//! packed into 32-bit words on the device (`packed`), and the projection `x·Wᵀ` against the
//! packed weight as a backend operation whose backward keeps only the packed weight.
//!
//! burn's own quantized matmul, under autodiff, dequantizes the whole weight and keeps that
//! f32 copy until the backward pass: every layer's copy at once, which throws the saving away.
//! Here the forward pass dequantizes one projection, multiplies and drops it; the backward
//! forms `grad_x = grad_y · W` from the packed words again. The weight is frozen, so nothing
//! else is needed: the input is kept only by the LoRA branch, as it is for a float base.

pub mod blocks;
mod cpu;
mod packed;

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::wgpu::CubeBackend;
use burn::backend::{AutodiffBackend, Backend, Dispatch, backend_extension};
use burn::tensor::Tensor;

pub use blocks::{BLOCK, Block, BlockFormat};
pub use packed::PackedWeight;

/// Weight values dequantized at once for a product: 16 MiB in f32, a tenth of a 7B MLP
/// projection, which whole (with its unpacking's temporaries on wgpu) would be the largest
/// transient of a quantized step.
const PANEL: usize = 1 << 22;

/// The width of the product of `x` with a packed `[out, in]` weight (`out` for `x · Wᵀ`, `in`
/// for the input's gradient `x · W`) and how many of its columns one panel of about `values`
/// dequantized weight values computes: rows of W, or whole blocks of W's columns.
fn panels(out: usize, d_in: usize, input_grad: bool, values: usize) -> (usize, usize) {
    match input_grad {
        false => (out, (values / d_in).clamp(1, out)),
        true => (d_in, (values / out / BLOCK * BLOCK).clamp(BLOCK, d_in)),
    }
}

/// `x: [.., in]` times the transpose of a packed `[out, in]` weight → `[.., out]`, in x's type.
pub fn linear<const D: usize>(x: Tensor<D>, weight: &PackedWeight) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as QuantLinearBackend>::ual_qlinear(
        x.into_dispatch(),
        weight.words.clone().into_dispatch(),
        weight.scales.clone().into_dispatch(),
        weight.format.bits(),
    ))
}

/// The packed weight dequantized, `[out, in]` f32: what [`linear`] multiplies by.
pub fn dequantize(weight: &PackedWeight) -> Tensor<2> {
    Tensor::from_dispatch(packed::dequantize::<Dispatch>(
        weight.words.clone().into_dispatch(),
        weight.scales.clone().into_dispatch(),
        weight.format.bits(),
        burn::tensor::DType::F32,
    ))
}

/// The quantized projection as backend operations: a default body of burn operations for
/// every backend, and a hand-written backward under autodiff.
#[backend_extension(Autodiff, Cube, Flex, Fusion)]
pub trait QuantLinearBackend: Backend {
    /// `x: [.., in]` · Wᵀ → `[.., out]` for W `[out, in]` held as `words: [out, in·bits/32]`
    /// and f32 or f16 `scales: [out, in/32]`; computed in x's type.
    #[fusion(default)]
    fn ual_qlinear(
        x: FloatTensor<Self>,
        words: IntTensor<Self>,
        scales: FloatTensor<Self>,
        bits: usize,
    ) -> FloatTensor<Self> {
        packed::linear::<Self>(x, words, scales, bits, false)
    }

    /// `g: [.., out]` · W → `[.., in]`: the input's gradient of [`Self::ual_qlinear`].
    #[fusion(default)]
    fn ual_qlinear_input_grad(
        g: FloatTensor<Self>,
        words: IntTensor<Self>,
        scales: FloatTensor<Self>,
        bits: usize,
    ) -> FloatTensor<Self> {
        packed::linear::<Self>(g, words, scales, bits, true)
    }
}

impl QuantLinearBackend for CubeBackend {}

impl<B: QuantLinearBackend, C: CheckpointStrategy> QuantLinearBackend for Autodiff<B, C> {
    fn ual_qlinear(
        x: FloatTensor<Self>,
        words: IntTensor<Self>,
        scales: FloatTensor<Self>,
        bits: usize,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct InputGrad {
            bits: usize,
        }

        impl<B: QuantLinearBackend> Backward<B, 1> for InputGrad {
            /// The packed weight: a few bits per value, never its dequantized copy.
            type State = (IntTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let grad = grads.consume::<B>(&ops.node);
                let [x_node] = ops.parents;
                let (words, scales) = ops.state;
                if let Some(node) = x_node {
                    let g = B::ual_qlinear_input_grad(grad, words, scales, self.bits);
                    grads.register::<B>(node.id, g);
                }
            }
        }

        let (x, x_node) = x.into_parts();
        let scales = Self::inner(scales);
        let y = B::ual_qlinear(x, words.clone(), scales.clone(), bits);
        let node = InputGrad { bits };
        match node.prepare::<C>([x_node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((words, scales), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn ual_qlinear_input_grad(
        g: FloatTensor<Self>,
        words: IntTensor<Self>,
        scales: FloatTensor<Self>,
        bits: usize,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::ual_qlinear_input_grad(
            Self::inner(g),
            words,
            Self::inner(scales),
            bits,
        ))
    }
}
