//! Fused linear cross-entropy: the LM head and the UAL loss, a chunk of rows at a time.
//!
//! The logits `[rows, V]` and their gradient are the largest tensors of LoRA fine-tuning
//! (2 × rows × V × 4 bytes). Here the head matmul, the fused loss and its gradient run on
//! `chunk_rows` rows at once, so only a `[chunk_rows, V]` block ever exists. As in Liger's
//! fused linear cross-entropy, the gradients with respect to the hidden states and the head are
//! formed during the forward pass, while each block is alive: the same three matmuls the unfused
//! head needs, with nothing recomputed. The backward only scales them by the upstream gradient,
//! which is why the operation returns the *summed* loss (a per-row output would need the head
//! gradient re-weighted row by row).
//!
//! The blocks below are burn operations, for any backend. The CPU runs the same blocks on gemm
//! directly, in one buffer (`super::cpu_head`), where burn would allocate each block anew.
//!
//! A block's hidden gradient `[rows, V] @ [V, H]` has a small output and a long inner dimension.
//! A GPU computes it in output tiles, so a 256-row block of a 512-wide model fills 8 of the
//! H100's 132 multiprocessors. With `vocab_splits = S` the vocabulary is cut into S slices whose
//! partial products run side by side as one batched matmul and are summed afterwards (split-K):
//! S times the tiles for the price of an `[S, rows, H]` sum. The loss kernel writes the block's
//! gradient slice-major, so the slices need no copy (a trained head, which needs the gradient
//! whole too, pays one copy of the block).

use std::ops::Range;

use anyhow::{Result, bail};
use burn::backend::TensorMetadata;
use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch};
use burn::tensor::{Shape, Slice, Tensor};

use super::fused::UalLossBackend;
use super::{LossSum, RowLabels};

/// Elements of one logits block: 8 Mi f32 = 32 MiB. On the CPU one block buffer serves the
/// whole call and the gradient overwrites it (`super::cpu_head`), so the head + loss hold one
/// block plus the `[rows, H]` hidden gradient: 1/25 of the unfused head at 4,096 rows and
/// V = 32,000.
pub const CHUNK_ELEMENTS: usize = 1 << 23;

/// Blocks hold a multiple of this many rows, and at least this many. The CPU matmul repacks the
/// head for every block, a cost of about 1/rows of the block's arithmetic: below ~128 rows it
/// shows (0.75× at 65 rows, V = 128,256). GPU matmuls work in tiles of rows: a block just past a
/// tile boundary pays for a nearly empty tile (on lavapipe 262-row blocks took 1.47× the
/// unfused time, 256-row blocks 1.1×).
pub const MIN_CHUNK_ROWS: usize = 128;

/// Rows per block for a vocabulary of `vocab`: [`CHUNK_ELEMENTS`] / V rounded down to a multiple
/// of [`MIN_CHUNK_ROWS`], and at least that.
pub fn default_chunk_rows(vocab: usize) -> usize {
    let rows = CHUNK_ELEMENTS / vocab.max(1);
    (rows / MIN_CHUNK_ROWS).max(1) * MIN_CHUNK_ROWS
}

/// How the fused head cuts its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadBlocks {
    /// Rows of logits that exist at once.
    pub rows: usize,
    /// Vocabulary slices of the hidden gradient (split-K); 1 = one plain matmul. A count that
    /// does not divide V is lowered to the largest one that does.
    pub vocab_splits: usize,
}

impl HeadBlocks {
    /// Blocks of `rows` rows with an unsplit hidden gradient.
    pub fn rows(rows: usize) -> Self {
        Self {
            rows,
            vocab_splits: 1,
        }
    }
}

/// Output tiles GPU matmuls of this size use (cubecl's largest); a conservative count of what a
/// block's hidden gradient occupies.
const GPU_TILE: usize = 128;
/// Tiles that keep a large GPU busy: about two per multiprocessor of an H100 (132).
const GPU_BUSY_TILES: usize = 256;
/// The narrowest vocabulary slice worth a matmul of its own.
const MIN_VOCAB_SLICE: usize = 1024;

/// Vocabulary slices for the hidden gradient of `rows`-row blocks on a hardware GPU: enough
/// for [`GPU_BUSY_TILES`] output tiles, no slice under [`MIN_VOCAB_SLICE`], dividing `vocab`.
/// Over-splitting costs little (the partial sums are `[S, rows, H]`); under-splitting leaves
/// most of the GPU idle for the longest matmul of the head.
pub fn gpu_vocab_splits(rows: usize, hidden: usize, vocab: usize) -> usize {
    let tiles = rows.div_ceil(GPU_TILE) * hidden.div_ceil(GPU_TILE);
    let wanted = GPU_BUSY_TILES
        .div_ceil(tiles.max(1))
        .min(vocab / MIN_VOCAB_SLICE);
    divisor_at_most(vocab, wanted)
}

/// The largest divisor of `n` that is at most `k` (1 when `k` is 0): the slice count used when
/// `k` slices of an `n`-word vocabulary are asked for.
pub fn divisor_at_most(n: usize, k: usize) -> usize {
    (1..=k.max(1))
        .rev()
        .find(|&d| n.is_multiple_of(d))
        .unwrap_or(1)
}

/// The UAL loss summed over counted rows of `hidden @ head`, with `hidden: [rows, H]` and
/// `head: [H, V]` (burn's `Linear` layout; a tied head is the embedding transposed).
/// Differentiable with respect to both; the head's gradient is formed only when it trains.
pub fn ual_linear_loss_sum(
    hidden: Tensor<2>,
    head: Tensor<2>,
    labels: &RowLabels,
    blocks: HeadBlocks,
) -> Result<LossSum> {
    let [rows, h] = hidden.dims();
    let [head_in, vocab] = head.dims();
    if h != head_in {
        bail!("fused linear loss: hidden width {h} but the head expects {head_in}");
    }
    labels.check_against([rows, vocab])?;
    let device = hidden.device();
    if rows == 0 {
        return Ok(LossSum {
            sum: Tensor::zeros([1], &device),
            count: 0,
        });
    }
    // Frozen weights may be stored in half precision; the loss is always computed in f32.
    let head = head.cast(hidden.dtype());
    let packed = labels.packed(&device);
    let sum = Tensor::from_dispatch(<Dispatch as UalLossBackend>::ual_linear_ce_sum(
        hidden.into_dispatch(),
        head.into_dispatch(),
        packed.into_dispatch(),
        blocks.rows.max(1),
        divisor_at_most(vocab, blocks.vocab_splits),
    ));
    Ok(LossSum {
        sum,
        count: labels.count(),
    })
}

/// The loss sum over blocks of `blocks.rows` rows and, where asked, its gradients with respect
/// to the hidden states and the head. Generic over the backend: every op is burn's or ours.
pub(super) fn chunked<B: UalLossBackend>(
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
    for range in chunks(rows, blocks.rows) {
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

fn chunks(rows: usize, chunk_rows: usize) -> impl Iterator<Item = Range<usize>> {
    (0..rows)
        .step_by(chunk_rows.max(1))
        .map(move |start| start..(start + chunk_rows).min(rows))
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

/// The `[rows, 2]` upstream gradient of the weighted loss sum with respect to each row's
/// statistics `(loss, lse)`: the row's weight for its loss, 0 for its lse. `labels` are the
/// packed `[rows, 3]` (target, ε, weight).
pub(super) fn loss_only_upstream(labels: &[f32]) -> Vec<f32> {
    labels.chunks_exact(3).flat_map(|l| [l[2], 0.0]).collect()
}

/// [`loss_only_upstream`] from the `[rows, 1]` weights, on `device`.
fn loss_only<B: Backend>(weight: FloatTensor<B>, device: &B::Device) -> FloatTensor<B> {
    let rows = weight.shape()[0];
    let zeros = B::float_zeros(Shape::new([rows, 1]), device, weight.dtype().into());
    B::float_cat(vec![weight, zeros], 1)
}

/// Column `c` of a `[rows, k]` tensor as `[rows, 1]`.
fn column<B: Backend>(t: FloatTensor<B>, c: usize) -> FloatTensor<B> {
    B::float_slice(t, &[Slice::from(..), Slice::from(c..c + 1)])
}

/// The autodiff implementation: gradients are formed in the forward pass when a parent is
/// tracked, and scaled by the upstream gradient in the backward pass.
pub(super) fn autodiff_loss_sum<B: UalLossBackend, C: CheckpointStrategy>(
    hidden: FloatTensor<Autodiff<B, C>>,
    head: FloatTensor<Autodiff<B, C>>,
    labels: FloatTensor<Autodiff<B, C>>,
    blocks: HeadBlocks,
) -> FloatTensor<Autodiff<B, C>> {
    #[derive(Debug)]
    struct LinearCeBackward;

    impl<B: Backend> Backward<B, 2> for LinearCeBackward {
        type State = (Option<FloatTensor<B>>, Option<FloatTensor<B>>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let upstream = grads.consume::<B>(&ops.node);
            let upstream = B::float_reshape(upstream, Shape::new([1, 1]));
            let [hidden_node, head_node] = ops.parents;
            let (grad_hidden, grad_head) = ops.state;
            for (node, grad) in [(hidden_node, grad_hidden), (head_node, grad_head)] {
                if let (Some(node), Some(grad)) = (node, grad) {
                    grads.register::<B>(node.id, B::float_mul(grad, upstream.clone()));
                }
            }
        }
    }

    let (want_hidden, want_head) = (hidden.is_tracked(), head.is_tracked());
    let (hidden, hidden_node) = hidden.into_parts();
    let (head, head_node) = head.into_parts();
    let (labels, _) = labels.into_parts();
    match LinearCeBackward
        .prepare::<C>([hidden_node, head_node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (sum, grad_hidden, grad_head) = B::ual_linear_ce_grads(
                hidden,
                head,
                labels,
                blocks.rows,
                blocks.vocab_splits,
                want_hidden,
                want_head,
            );
            prep.finish((grad_hidden, grad_head), sum)
        }
        OpsKind::UnTracked(prep) => {
            let sum = B::ual_linear_ce_sum(hidden, head, labels, blocks.rows, blocks.vocab_splits);
            prep.finish(sum)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_blocks_are_whole_tiles_of_rows() {
        assert_eq!(default_chunk_rows(32_000), 256);
        assert_eq!(default_chunk_rows(128_256), 128);
        assert_eq!(default_chunk_rows(97), (CHUNK_ELEMENTS / 97) / 128 * 128);
        assert_eq!(default_chunk_rows(10_000_000), MIN_CHUNK_ROWS);
    }

    #[test]
    fn gpu_splits_fill_the_tiles_and_divide_the_vocabulary() {
        // 256 rows × 512 wide = 8 tiles: 32 slices wanted, 31 allowed (≥ 1024 wide), 25 divides.
        assert_eq!(gpu_vocab_splits(256, 512, 32_000), 25);
        // 256 × 768 = 12 tiles: 22 wanted; 20 divides 32,000.
        assert_eq!(gpu_vocab_splits(256, 768, 32_000), 20);
        // 128 × 512 = 4 tiles: 64 wanted; 128,256 = 2⁸·3·167, so 64.
        assert_eq!(gpu_vocab_splits(128, 512, 128_256), 64);
        // A block that already fills the GPU, or a vocabulary too small to slice: none.
        assert_eq!(gpu_vocab_splits(4096, 2048, 32_000), 1);
        assert_eq!(gpu_vocab_splits(256, 64, 97), 1);
        assert_eq!(divisor_at_most(97, 8), 1);
        assert_eq!(divisor_at_most(32_000, 0), 1);
    }
}
