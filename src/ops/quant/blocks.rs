//! llama.cpp's symmetric block formats, Q8_0 and Q4_0, quantized on the host exactly as
//! `quantize_row_q8_0_ref` / `quantize_row_q4_0_ref` in ggml-quants.c do it (gguf-py's
//! `gguf.quants.quantize` is the same arithmetic, and the tests hold ual to it byte for byte).
//!
//! A block is 32 consecutive values of a row with one f16 scale `d`:
//! - Q8_0: `d = amax / 127`, `q = roundf(x / d)` in −127..127, value `d·q`; 34 bytes.
//! - Q4_0: `d = max / −8` where `max` is the value of largest magnitude,
//!   `q = min(15, (int)(x/d + 8.5))` in 0..15, value `d·(q − 8)`; 18 bytes, the low nibbles
//!   holding values 0..15 of the block and the high nibbles values 16..31.
//!
//! Both quantize with the reciprocal of the unrounded f32 scale and store the scale rounded to
//! f16, as the reference does; dequantization is one f32 product, `f32(d)·q`.

use half::f16;

/// Values per block, for both formats.
pub const BLOCK: usize = 32;

/// A symmetric block format of llama.cpp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockFormat {
    /// 8-bit values, 34 bytes per 32.
    Q8_0,
    /// 4-bit values, 18 bytes per 32.
    Q4_0,
}

impl BlockFormat {
    /// Bytes of one block in llama.cpp's layout (the f16 scale first).
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q8_0 => 2 + BLOCK,
            Self::Q4_0 => 2 + BLOCK / 2,
        }
    }

    /// Bits of one stored value.
    pub fn bits(self) -> usize {
        match self {
            Self::Q8_0 => 8,
            Self::Q4_0 => 4,
        }
    }

    /// The name llama.cpp and ual's settings give it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
        }
    }
}

/// One quantized block: its f16 scale and its 32 values as signed integers (Q4_0's `q − 8`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Block {
    /// The scale `d`.
    pub d: f16,
    /// The values, each `x ≈ d·q`.
    pub q: [i8; BLOCK],
}

/// Quantizes one block of 32 values as llama.cpp's reference quantizer does.
pub fn quantize_block(format: BlockFormat, x: &[f32]) -> Block {
    assert_eq!(x.len(), BLOCK, "a block is {BLOCK} values");
    match format {
        BlockFormat::Q8_0 => quantize_q8_0(x),
        BlockFormat::Q4_0 => quantize_q4_0(x),
    }
}

fn quantize_q8_0(x: &[f32]) -> Block {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    // C's roundf: halves away from zero, which is what f32::round does.
    Block {
        d: f16::from_f32(d),
        q: std::array::from_fn(|j| (x[j] * id).round() as i8),
    }
}

fn quantize_q4_0(x: &[f32]) -> Block {
    // The value of largest magnitude, the first one on a tie, sign kept.
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    Block {
        d: f16::from_f32(d),
        // `(int8_t)(x·id + 8.5)` truncates toward zero, then is capped at 15.
        q: std::array::from_fn(|j| (((x[j] * id + 8.5) as i8).min(15)) - 8),
    }
}

impl Block {
    /// The block in llama.cpp's byte layout.
    pub fn to_bytes(&self, format: BlockFormat, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.d.to_le_bytes());
        match format {
            BlockFormat::Q8_0 => out.extend(self.q.iter().map(|&q| q as u8)),
            BlockFormat::Q4_0 => out.extend((0..BLOCK / 2).map(|j| {
                let lo = (self.q[j] + 8) as u8;
                let hi = (self.q[j + BLOCK / 2] + 8) as u8;
                lo | (hi << 4)
            })),
        }
    }

    /// A block read from llama.cpp's byte layout (`bytes` is exactly one block).
    pub fn from_bytes(format: BlockFormat, bytes: &[u8]) -> Self {
        assert_eq!(
            bytes.len(),
            format.block_bytes(),
            "one {} block",
            format.name()
        );
        let d = f16::from_le_bytes([bytes[0], bytes[1]]);
        let body = &bytes[2..];
        let q = match format {
            BlockFormat::Q8_0 => std::array::from_fn(|j| body[j] as i8),
            BlockFormat::Q4_0 => std::array::from_fn(|j| {
                let byte = body[j % (BLOCK / 2)];
                let nibble = if j < BLOCK / 2 {
                    byte & 0x0F
                } else {
                    byte >> 4
                };
                nibble as i8 - 8
            }),
        };
        Self { d, q }
    }

    /// The values `f32(d)·q`, as llama.cpp and gguf-py dequantize them.
    pub fn dequantize(&self) -> [f32; BLOCK] {
        let d = self.d.to_f32();
        std::array::from_fn(|j| d * self.q[j] as f32)
    }
}

/// Quantizes a row-major `[rows, cols]` matrix row by row, `cols` a multiple of [`BLOCK`]:
/// the blocks of row 0, then of row 1, and so on, as a GGUF tensor stores them.
pub fn quantize_rows(format: BlockFormat, values: &[f32], cols: usize) -> Vec<Block> {
    assert!(
        cols.is_multiple_of(BLOCK),
        "rows of {cols} values are not whole blocks"
    );
    values
        .chunks_exact(BLOCK)
        .map(|x| quantize_block(format, x))
        .collect()
}

/// The blocks in llama.cpp's byte layout, one after another.
pub fn to_bytes(format: BlockFormat, blocks: &[Block]) -> Vec<u8> {
    let mut out = Vec::with_capacity(blocks.len() * format.block_bytes());
    for b in blocks {
        b.to_bytes(format, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_block_has_a_zero_scale_and_zero_values() {
        for format in [BlockFormat::Q8_0, BlockFormat::Q4_0] {
            let b = quantize_block(format, &[0.0; BLOCK]);
            assert_eq!(b.d.to_f32(), 0.0);
            assert!(b.dequantize().iter().all(|&v| v == 0.0));
        }
    }

    #[test]
    fn bytes_round_trip() {
        let x: Vec<f32> = (0..BLOCK).map(|i| (i as f32 - 13.3) * 0.37).collect();
        for format in [BlockFormat::Q8_0, BlockFormat::Q4_0] {
            let b = quantize_block(format, &x);
            let mut bytes = Vec::new();
            b.to_bytes(format, &mut bytes);
            assert_eq!(bytes.len(), format.block_bytes());
            assert_eq!(Block::from_bytes(format, &bytes), b);
        }
    }

    #[test]
    fn q4_0_maps_the_largest_magnitude_to_minus_eight() {
        let mut x = [0.5f32; BLOCK];
        x[7] = -4.0;
        let b = quantize_block(BlockFormat::Q4_0, &x);
        assert_eq!(b.q[7], -8);
        assert_eq!(b.dequantize()[7], -4.0);
    }
}
