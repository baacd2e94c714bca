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
use burn::tensor::{DType, FloatDType, Shape, Slice};

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
    // A frozen head kept in a half type is widened a slice at a time (`HalfHead`), its hidden
    // gradient summed over those slices: no split-K there.
    let half =
        (head.dtype() != DType::F32).then(|| HalfHead::<B>::new(head.clone(), WIDENED_VALUES));
    let splits = if half.is_some() {
        1
    } else {
        blocks.vocab_splits
    };
    let head_t = (want_hidden && half.is_none())
        .then(|| vocab_sliced::<B>(B::float_transpose(head.clone()), splits));
    let mut sum: Option<FloatTensor<B>> = None;
    let mut grad_hidden = Vec::new();
    let mut grad_head: Option<FloatTensor<B>> = None;
    for range in chunks(rows, blocks.block_rows) {
        let h = rows_of::<B>(hidden.clone(), range.clone());
        let labels = rows_of::<B>(labels.clone(), range.clone());
        let logits = match &half {
            Some(half) => half.logits(h.clone()),
            None => B::float_matmul(h.clone(), head.clone()),
        };
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
        } else if let (true, Some(half)) = (want_hidden, &half) {
            grad_hidden.push(half.hidden_gradient(grad_logits.clone()));
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

/// Head values widened to f32 at once under a half head (`HalfHead`): 32 MiB.
const WIDENED_VALUES: usize = 1 << 23;

/// A frozen `[H, V]` head kept in a half type (`model::precision`), multiplied in f32 one
/// slice of the vocabulary at a time: the products of [`chunked`] with at most `budget` head
/// values in f32 at once, never the whole head (0.5 GB for a 7B model). Only a frozen head is
/// kept in a half type, so no head gradient is formed here.
struct HalfHead<B: Backend> {
    head: FloatTensor<B>,
    slices: Vec<Range<usize>>,
}

impl<B: Backend> HalfHead<B> {
    fn new(head: FloatTensor<B>, budget: usize) -> Self {
        let [hidden, vocab] = [head.shape()[0], head.shape()[1]];
        let slices = chunks(vocab, (budget / hidden.max(1)).max(1)).collect();
        Self { head, slices }
    }

    /// Columns `cols` of the head in f32, `[H, cols]`.
    fn widened(&self, cols: Range<usize>) -> FloatTensor<B> {
        let columns = B::float_slice(self.head.clone(), &[Slice::from(..), Slice::from(cols)]);
        B::float_cast(columns, FloatDType::F32)
    }

    /// `h @ head`, `[r, V]`: each slice's columns, side by side.
    fn logits(&self, h: FloatTensor<B>) -> FloatTensor<B> {
        let parts = self.slices.iter().cloned();
        let parts = parts.map(|cols| B::float_matmul(h.clone(), self.widened(cols)));
        B::float_cat(parts.collect(), 1)
    }

    /// `grad_logits @ headᵀ`, `[r, H]`: the sum of each slice's product.
    fn hidden_gradient(&self, grad_logits: FloatTensor<B>) -> FloatTensor<B> {
        let mut sum = None;
        for cols in self.slices.iter().cloned() {
            let g = B::float_slice(
                grad_logits.clone(),
                &[Slice::from(..), Slice::from(cols.clone())],
            );
            let part = B::float_matmul(g, B::float_transpose(self.widened(cols)));
            sum = Some(accumulate::<B>(sum, part));
        }
        sum.expect("a head has at least one column")
    }
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

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::tensor::TensorData;

    use super::*;

    fn values(t: FlexTensor) -> Vec<f32> {
        let data = TensorData::from_bytes_vec(t.bytes().to_vec(), t.shape(), t.dtype());
        data.convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    /// `a @ b` and `a @ bᵀ` through the backend, as `chunked` multiplies.
    fn products<B: Backend>(
        a: FloatTensor<B>,
        b: FloatTensor<B>,
        g: FloatTensor<B>,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let b = B::float_cast(b, FloatDType::F32);
        (
            B::float_matmul(a, b.clone()),
            B::float_matmul(g, B::float_transpose(b)),
        )
    }

    /// A half head over 8 slices of 5 columns (the last of 2) multiplies as its f32 copy does:
    /// the same products, only the hidden gradient's sum over the slices reordered.
    #[test]
    fn a_half_head_multiplies_slice_by_slice_as_its_f32_copy() {
        let (rows, hidden, vocab) = (3, 8, 37);
        let seq = |n: usize, k: usize| -> Vec<f32> {
            (0..n).map(|i| ((i * k) % 17) as f32 / 8.0 - 1.0).collect()
        };
        let f16s: Vec<half::f16> = seq(hidden * vocab, 7)
            .into_iter()
            .map(half::f16::from_f32)
            .collect();
        let head = FlexTensor::from_data(TensorData::new(f16s, [hidden, vocab]));
        let h = FlexTensor::from_data(TensorData::new(seq(rows * hidden, 5), [rows, hidden]));
        let g = FlexTensor::from_data(TensorData::new(seq(rows * vocab, 3), [rows, vocab]));
        let half = HalfHead::<Flex>::new(head.clone(), 5 * hidden);
        assert_eq!(half.slices.len(), 8);
        let (logits, grad) = products::<Flex>(h.clone(), head, g.clone());
        assert_eq!(values(half.logits(h)), values(logits));
        let ours = values(half.hidden_gradient(g));
        for (a, b) in ours.iter().zip(&values(grad)) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}
