//! Fused linear cross-entropy: the LM head and the UAL loss a block of rows at a time, so the
//! `[rows, V]` logits never exist whole (the kernels and their backward are `crate::ops::ce`).
//!
//! This module decides the blocks: how many rows a block holds and, on GPUs, how many
//! vocabulary slices a block's hidden gradient is split into.

use anyhow::{Result, bail};
use burn::tensor::Tensor;

pub use crate::ops::ce::HeadBlocks;

use super::{LossSum, RowLabels};

/// Elements of one logits block: 8 Mi f32 = 32 MiB. On the CPU one block buffer serves the
/// whole call and the gradient overwrites it (`crate::ops::ce`, on flex), so the head + loss hold one
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
    let blocks = HeadBlocks {
        rows: blocks.rows.max(1),
        vocab_splits: divisor_at_most(vocab, blocks.vocab_splits),
    };
    let sum = crate::ops::ce::linear_ce_sum(hidden, head, labels.packed(&device), blocks);
    Ok(LossSum {
        sum,
        count: labels.count(),
    })
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
