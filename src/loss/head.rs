//! The fused head's plan: how the LM head and the loss are cut, decided once from the
//! configuration and the device and carried whole to the kernels ([`HeadBlocks`]): how many rows
//! a block holds and, on GPUs, how many vocabulary slices a block's hidden gradient is split
//! into.

pub use crate::ops::ce::HeadBlocks;

use crate::model::Llama;

/// Elements of one logits block: 8 Mi f32 = 32 MiB. On the CPU one block buffer serves the
/// whole call and the gradient overwrites it (`crate::ops::ce`, on flex), so the head + loss hold one
/// block plus the `[rows, H]` hidden gradient: 1/25 of the unfused head at 4,096 rows and
/// V = 32,000.
pub const BLOCK_ELEMENTS: usize = 1 << 23;

/// Blocks hold a multiple of this many rows, and at least this many. The CPU matmul repacks the
/// head for every block, a cost of about 1/rows of the block's arithmetic: below ~128 rows it
/// shows (0.75× at 65 rows, V = 128,256). GPU matmuls work in tiles of rows: a block just past a
/// tile boundary pays for a nearly empty tile (on lavapipe 262-row blocks took 1.47× the
/// unfused time, 256-row blocks 1.1×).
pub const MIN_BLOCK_ROWS: usize = 128;

/// Rows per block for a vocabulary of `vocab`: [`BLOCK_ELEMENTS`] / V rounded down to a multiple
/// of [`MIN_BLOCK_ROWS`], and at least that.
pub fn default_block_rows(vocab: usize) -> usize {
    let rows = BLOCK_ELEMENTS / vocab.max(1);
    (rows / MIN_BLOCK_ROWS).max(1) * MIN_BLOCK_ROWS
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

/// How the LM head and the loss are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadPlan {
    /// The fused linear cross-entropy (`loss::linear`): no `[rows, V]` logits tensor.
    pub fused: bool,
    /// Its blocks; unfused, `block_rows` rows of logits at a time (one binding's worth on wgpu)
    /// and no vocabulary split.
    pub blocks: HeadBlocks,
}

impl HeadPlan {
    /// The fused head in blocks of [`default_block_rows`], capped at what one binding holds.
    pub fn fused(vocab: usize, rows_per_binding: usize) -> Self {
        Self::new(true, vocab, rows_per_binding, 0)
    }

    /// Logits for `block_rows` rows at a time, then the fused loss on them.
    pub fn unfused(block_rows: usize) -> Self {
        Self {
            fused: false,
            blocks: HeadBlocks::unsplit(block_rows),
        }
    }

    /// The plan a training configuration asks for; `block_rows` 0 means [`default_block_rows`].
    pub fn new(fused: bool, vocab: usize, rows_per_binding: usize, block_rows: usize) -> Self {
        if !fused {
            return Self::unfused(rows_per_binding);
        }
        let rows = match block_rows {
            0 => default_block_rows(vocab),
            rows => rows,
        };
        Self {
            fused: true,
            blocks: HeadBlocks::unsplit(rows.min(rows_per_binding)),
        }
    }

    /// Splits the fused head's hidden gradient over the vocabulary: `setting` slices, or with 0
    /// as many as fill a hardware GPU ([`gpu_vocab_splits`]) and none on a CPU or a software
    /// adapter, whose few cores the unsplit blocks already keep busy.
    pub fn split_vocab(mut self, setting: usize, hidden: usize, vocab: usize, gpu: bool) -> Self {
        self.blocks.vocab_splits = match setting {
            _ if !self.fused => 1,
            0 if gpu => gpu_vocab_splits(self.blocks.block_rows, hidden, vocab),
            0 => 1,
            n => divisor_at_most(vocab, n),
        };
        self
    }

    /// `model` with its head stored the way this plan reads it: vocabulary-major when the
    /// hidden gradient is split, so that the slices are views ([`Llama::with_vocab_major_head`]).
    pub fn arrange(self, model: Llama) -> Llama {
        match self.blocks.vocab_splits {
            1 => model,
            _ => model.with_vocab_major_head(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_blocks_are_whole_tiles_of_rows() {
        assert_eq!(default_block_rows(32_000), 256);
        assert_eq!(default_block_rows(128_256), 128);
        assert_eq!(default_block_rows(97), (BLOCK_ELEMENTS / 97) / 128 * 128);
        assert_eq!(default_block_rows(10_000_000), MIN_BLOCK_ROWS);
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

    #[test]
    fn block_rows_are_the_default_or_asked_for_and_fit_a_binding() {
        let default = default_block_rows(32_000);
        assert_eq!(
            HeadPlan::new(true, 32_000, usize::MAX, 0).blocks.block_rows,
            default
        );
        assert_eq!(
            HeadPlan::new(true, 32_000, usize::MAX, 1024)
                .blocks
                .block_rows,
            1024
        );
        assert_eq!(
            HeadPlan::new(true, 32_000, 500, 1024).blocks.block_rows,
            500
        );
        let unfused = HeadPlan::new(false, 32_000, 700, 1024);
        assert!(!unfused.fused);
        assert_eq!(unfused.blocks.block_rows, 700);
    }

    #[test]
    fn vocabulary_splits_are_automatic_on_gpus_only_and_can_be_forced() {
        let fused = HeadPlan::new(true, 32_000, usize::MAX, 0);
        assert_eq!(
            fused.split_vocab(0, 768, 32_000, true).blocks.vocab_splits,
            20
        );
        assert_eq!(
            fused.split_vocab(0, 768, 32_000, false).blocks.vocab_splits,
            1
        );
        assert_eq!(
            fused.split_vocab(8, 768, 32_000, false).blocks.vocab_splits,
            8
        );
        assert_eq!(
            fused.split_vocab(1, 768, 32_000, true).blocks.vocab_splits,
            1
        );
        // 24 does not divide 32,000: the largest count that does.
        assert_eq!(
            fused
                .split_vocab(24, 768, 32_000, false)
                .blocks
                .vocab_splits,
            20
        );
        let unfused = HeadPlan::new(false, 32_000, 700, 0);
        assert_eq!(
            unfused
                .split_vocab(8, 768, 32_000, true)
                .blocks
                .vocab_splits,
            1
        );
    }
}
