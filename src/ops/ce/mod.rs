//! The fused UAL cross-entropy kernels: one backend trait ([`UalLossBackend`]), its default
//! bodies (`backend`), and an implementation per backend: the CPU (`flex`), wgpu's WGSL
//! kernels (`cube`) and autodiff's hand-written backwards (`autodiff`). `host` is the
//! row-parallel arithmetic the CPU and the default bodies share.
//!
//! The tensor-level API (labels, validation, the head's block sizes) is `crate::loss`'s.

mod autodiff;
mod backend;
mod cube;
mod flex;
pub(crate) mod host;

use burn::backend::Dispatch;
use burn::tensor::Tensor;

pub use backend::{HeadBlocks, UalLossBackend, chunked};

/// Per-row UAL loss `[rows]` from logits `[rows, V]` and packed labels `[rows, 3]`.
pub fn row_losses(logits: Tensor<2>, labels: Tensor<2>) -> Tensor<1> {
    let [rows, _] = logits.dims();
    let stats: Tensor<2> = Tensor::from_dispatch(<Dispatch as UalLossBackend>::ual_ce_forward(
        logits.into_dispatch(),
        labels.into_dispatch(),
    ));
    stats.narrow(1, 0, 1).reshape([rows])
}

/// The fused linear cross-entropy's summed loss `[1]` of `hidden @ head` against packed labels,
/// in blocks of `blocks.block_rows` rows; differentiable with respect to `hidden` and `head`.
pub fn linear_ce_sum(
    hidden: Tensor<2>,
    head: Tensor<2>,
    labels: Tensor<2>,
    blocks: HeadBlocks,
) -> Tensor<1> {
    Tensor::from_dispatch(<Dispatch as UalLossBackend>::ual_linear_ce_sum(
        hidden.into_dispatch(),
        head.into_dispatch(),
        labels.into_dispatch(),
        HeadBlocks {
            block_rows: blocks.block_rows.max(1),
            ..blocks
        },
    ))
}
