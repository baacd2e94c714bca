//! The fused UAL cross-entropy as a burn backend extension: the trait, and the default bodies
//! every backend without its own kernels runs.
//!
//! Two operations make the loss: `ual_ce_forward` reads each logits row once and returns
//! `[rows, 2]` statistics (loss, lse); `ual_ce_backward` writes softmax − q into the gradient
//! from the saved lse. On wgpu they are the WGSL kernels of `shaders/` (`super::cube`); elsewhere
//! the row-parallel host loop of `super::host`, with the same arithmetic. The fused head is an
//! operation too (`ual_linear_ce_grads`), so that the CPU can run it on gemm directly
//! (`super::flex`); its default body is [`chunked`], blocks of burn operations.
//!
//! The logits `[rows, V]` and their gradient are the largest tensors of LoRA fine-tuning
//! (2 × rows × V × 4 bytes). The fused head runs the head matmul, the loss and its gradient on
//! `block_rows` rows at once, so only a `[block_rows, V]` block ever exists. As in Liger's fused
//! linear cross-entropy, the gradients with respect to the hidden states and the head are formed
//! during the forward pass, while each block is alive: the same three matmuls the unfused head
//! needs, with nothing recomputed. The backward only scales them by the upstream gradient, which
//! is why the operation returns the *summed* loss.
//!
//! A block's hidden gradient `[rows, V] @ [V, H]` has a small output and a long inner dimension.
//! A GPU computes it in output tiles, so a 256-row block of a 512-wide model fills 8 of the
//! H100's 132 multiprocessors. With `vocab_splits = S` the vocabulary is cut into S slices whose
//! partial products run side by side as one batched matmul and are summed afterwards (split-K):
//! S times the tiles for the price of an `[S, rows, H]` sum. The loss kernel writes the block's
//! gradient slice-major, so the slices need no copy (a trained head, which needs the gradient
//! whole too, pays one copy of the block).

use std::ops::Range;

use burn::backend::TensorMetadata;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, backend_extension};
use burn::tensor::{DType, Shape, Slice};

use super::host;

/// How the fused head cuts its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadBlocks {
    /// Rows of logits that exist at once.
    pub block_rows: usize,
    /// Vocabulary slices of the hidden gradient (split-K); 1 = one plain matmul. A count that
    /// does not divide V is lowered to the largest one that does.
    pub vocab_splits: usize,
}

impl HeadBlocks {
    /// Blocks of `block_rows` rows with an unsplit hidden gradient.
    pub fn unsplit(block_rows: usize) -> Self {
        Self {
            block_rows,
            vocab_splits: 1,
        }
    }
}

/// The shape of the per-row statistics: `[rows, 2]`.
pub fn stats_shape(logits: &Shape) -> Shape {
    Shape::new([logits[0], 2])
}

/// The shape of a gradient written slice-major: `[slices, rows, V / slices]`.
pub fn sliced_shape(logits: &Shape, slices: &usize) -> Shape {
    Shape::new([*slices, logits[0], logits[1] / slices])
}

/// A `[rows, V]` gradient seen slice-major (a view; the matmul that reads it makes the copy).
pub(crate) fn slice_major<B: Backend>(grad: FloatTensor<B>, slices: usize) -> FloatTensor<B> {
    let [rows, vocab] = [grad.shape()[0], grad.shape()[1]];
    let grad = B::float_reshape(grad, Shape::new([rows, slices, vocab / slices]));
    B::float_swap_dims(grad, 0, 1)
}

/// The fused UAL cross-entropy as backend operations; every backend runs the default bodies unless it has its own.
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
    /// of the vocabulary reads without a copy ([`chunked`]). `slices` divides V.
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
    /// summed over counted rows, the head applied `blocks.block_rows` rows at a time
    /// ([`chunked`]); under autodiff the hidden gradient is formed over `blocks.vocab_splits`
    /// slices of the vocabulary.
    #[fusion(default)]
    fn ual_linear_ce_sum(
        hidden: FloatTensor<Self>,
        head: FloatTensor<Self>,
        labels: FloatTensor<Self>,
        blocks: HeadBlocks,
    ) -> FloatTensor<Self> {
        Self::ual_linear_ce_grads(hidden, head, labels, blocks, false, false).0
    }

    /// The summed loss of [`Self::ual_linear_ce_sum`] with the gradients of that sum with
    /// respect to the hidden states and the head, each formed only where asked: `(sum,
    /// hidden gradient, head gradient)`.
    #[fusion(default)]
    fn ual_linear_ce_grads(
        hidden: FloatTensor<Self>,
        head: FloatTensor<Self>,
        labels: FloatTensor<Self>,
        blocks: HeadBlocks,
        want_hidden: bool,
        want_head: bool,
    ) -> (
        FloatTensor<Self>,
        Option<FloatTensor<Self>>,
        Option<FloatTensor<Self>>,
    ) {
        chunked::<Self>(hidden, head, labels, blocks, want_hidden, want_head)
    }
}
/// The loss sum over blocks of `blocks.block_rows` rows and, where asked, its gradients with respect
/// to the hidden states and the head. Generic over the backend: every op is burn's or ours.
pub fn chunked<B: UalLossBackend>(
    hidden: FloatTensor<B>,
    head: FloatTensor<B>,
    labels: FloatTensor<B>,
    blocks: HeadBlocks,
    want_hidden: bool,
    want_head: bool,
) -> (
    FloatTensor<B>,
    Option<FloatTensor<B>>,
    Option<FloatTensor<B>>,
) {
    let rows = hidden.shape()[0];
    let device = hidden.device();
    let splits = blocks.vocab_splits;
    let head_t = want_hidden.then(|| vocab_sliced::<B>(B::float_transpose(head.clone()), splits));
    let mut sum: Option<FloatTensor<B>> = None;
    let mut grad_hidden = Vec::new();
    let mut grad_head: Option<FloatTensor<B>> = None;
    for range in chunks(rows, blocks.block_rows) {
        let h = rows_of::<B>(hidden.clone(), range.clone());
        let labels = rows_of::<B>(labels.clone(), range.clone());
        let logits = B::float_matmul(h.clone(), head.clone());
        let stats = B::ual_ce_forward(logits.clone(), labels.clone());
        // Each row's loss weighs what its label's third column says (0 on masked rows).
        let weight = column::<B>(labels.clone(), 2);
        let part = B::float_sum(B::float_mul(column::<B>(stats.clone(), 0), weight.clone()));
        sum = Some(accumulate::<B>(sum, part));
        if !(want_hidden || want_head) {
            continue;
        }
        // ∂(Σ w·loss)/∂stats for this block: w on each row's loss, 0 on its lse.
        let upstream = loss_only::<B>(weight, &device);
        if splits > 1 && !want_head {
            // A frozen head (LoRA): the kernel writes the gradient slice by slice, ready for
            // the batched matmul.
            let sliced = B::ual_ce_backward_sliced(logits, labels, stats, upstream, splits);
            let head_t = head_t.clone().expect("the hidden gradient is wanted");
            grad_hidden.push(sum_of_slices::<B>(B::float_matmul(sliced, head_t)));
            continue;
        }
        let grad_logits = B::ual_ce_backward(logits, labels, stats, upstream);
        if let Some(head_t) = &head_t {
            let g = hidden_gradient::<B>(grad_logits.clone(), head_t.clone(), splits);
            grad_hidden.push(g);
        }
        if want_head {
            let g = B::float_matmul(B::float_transpose(h), grad_logits);
            grad_head = Some(accumulate::<B>(grad_head, g));
        }
    }
    (
        sum.expect("at least one row"),
        (!grad_hidden.is_empty()).then(|| B::float_cat(grad_hidden, 0)),
        grad_head,
    )
}

/// The transposed head `[V, H]` as `[S, V/S, H]` slices of the vocabulary. Free when the head is
/// stored vocabulary-major (a tied embedding, or an untied head as the model loads it); a
/// row-major `[H, V]` head is copied once here.
fn vocab_sliced<B: Backend>(head_t: FloatTensor<B>, splits: usize) -> FloatTensor<B> {
    if splits == 1 {
        return head_t;
    }
    let [vocab, hidden] = [head_t.shape()[0], head_t.shape()[1]];
    B::float_reshape(head_t, Shape::new([splits, vocab / splits, hidden]))
}

/// `grad_logits [r, V] @ head_t`: one matmul, or with `splits` > 1 a batched matmul over
/// vocabulary slices (`head_t: [S, V/S, H]`; the matmul copies the block into slices, which a
/// trained head's gradient needs whole as well) and the sum of its partial products.
fn hidden_gradient<B: Backend>(
    grad_logits: FloatTensor<B>,
    head_t: FloatTensor<B>,
    splits: usize,
) -> FloatTensor<B> {
    if splits == 1 {
        return B::float_matmul(grad_logits, head_t);
    }
    let [r, vocab] = [grad_logits.shape()[0], grad_logits.shape()[1]];
    let slices = B::float_reshape(grad_logits, Shape::new([r, splits, vocab / splits]));
    sum_of_slices::<B>(B::float_matmul(B::float_swap_dims(slices, 0, 1), head_t))
}

/// `[S, r, H]` partial products → their `[r, H]` sum.
fn sum_of_slices<B: Backend>(partial: FloatTensor<B>) -> FloatTensor<B> {
    let [r, hidden] = [partial.shape()[1], partial.shape()[2]];
    B::float_reshape(B::float_sum_dim(partial, 0), Shape::new([r, hidden]))
}

fn chunks(rows: usize, block_rows: usize) -> impl Iterator<Item = Range<usize>> {
    (0..rows)
        .step_by(block_rows.max(1))
        .map(move |start| start..(start + block_rows).min(rows))
}

fn rows_of<B: Backend>(t: FloatTensor<B>, range: Range<usize>) -> FloatTensor<B> {
    B::float_slice(t, &[Slice::from(range), Slice::from(..)])
}

fn accumulate<B: Backend>(acc: Option<FloatTensor<B>>, part: FloatTensor<B>) -> FloatTensor<B> {
    match acc {
        Some(acc) => B::float_add(acc, part),
        None => part,
    }
}

/// [`host::loss_only_upstream`] from the `[rows, 1]` weights, on `device`.
fn loss_only<B: Backend>(weight: FloatTensor<B>, device: &B::Device) -> FloatTensor<B> {
    let rows = weight.shape()[0];
    let zeros = B::float_zeros(Shape::new([rows, 1]), device, weight.dtype().into());
    B::float_cat(vec![weight, zeros], 1)
}

/// Column `c` of a `[rows, k]` tensor as `[rows, 1]`.
fn column<B: Backend>(t: FloatTensor<B>, c: usize) -> FloatTensor<B> {
    B::float_slice(t, &[Slice::from(..), Slice::from(c..c + 1)])
}
