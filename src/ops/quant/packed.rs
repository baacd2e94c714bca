//! A quantized weight on the device: its block values packed into 32-bit words, row by row,
//! and one scale per block.
//!
//! Word `w` of a row holds values `w·n .. (w+1)·n` of that row (n = 32 / bits), value `k` in
//! bits `k·bits ..`, each stored as `q + 2^(bits−1)` (Q4_0's own nibble, Q8_0's byte offset
//! by 128), so that a shift and a mask recover it on every backend and every shader compiler.
//! A Q4_0 weight is thus 0.5 byte per value plus its scales, as in llama.cpp's file.

use std::ops::Range;

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, Scalar, TensorMetadata};
use burn::module::Module;
use burn::tensor::{DType, Device, FloatDType, Int, Shape, Slice, Tensor, TensorData};

use super::blocks::{BLOCK, Block, BlockFormat};

/// A frozen `[out, in]` weight in Q8_0 or Q4_0 blocks along `in`.
#[derive(Module, Debug)]
pub struct PackedWeight {
    /// `[out, in·bits/32]` words (i32 on the device).
    pub words: Tensor<2, Int>,
    /// `[out, in/32]` block scales, f16 where the device computes in f16, else f32 (the f16
    /// scale widened exactly).
    pub scales: Tensor<2>,
    /// Q8_0 or Q4_0.
    #[module(skip)]
    pub format: BlockFormat,
}

impl PackedWeight {
    /// Packs the blocks of a row-major `[out, in]` matrix (row 0's blocks first, as
    /// [`super::blocks::quantize_rows`] returns them) onto `device`, its scales in
    /// `scale_dtype` (f16 or f32).
    pub fn new(
        format: BlockFormat,
        blocks: &[Block],
        [out, d_in]: [usize; 2],
        scale_dtype: DType,
        device: &Device,
    ) -> Self {
        assert_eq!(
            blocks.len() * BLOCK,
            out * d_in,
            "blocks of an [{out}, {d_in}] matrix"
        );
        let bits = format.bits();
        let per_word = 32 / bits;
        let offset = 1i32 << (bits - 1);
        let mut words = Vec::with_capacity(out * d_in / per_word);
        for block in blocks {
            for chunk in block.q.chunks_exact(per_word) {
                let word = chunk.iter().enumerate().fold(0u32, |w, (k, &q)| {
                    w | (((q as i32 + offset) as u32) << (k * bits))
                });
                words.push(word as i32);
            }
        }
        let scales: Vec<f32> = blocks.iter().map(|b| b.d.to_f32()).collect();
        let words = TensorData::new(words, [out, d_in / per_word]);
        let scales = TensorData::new(scales, [out, d_in / BLOCK]).convert_dtype(scale_dtype);
        Self {
            words: Tensor::from_data(words, device),
            scales: Tensor::from_data(scales, device),
            format,
        }
    }

    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        let [out, words] = self.words.dims();
        [out, words * 32 / self.format.bits()]
    }
}

/// The weight `[out, in]` in `dtype`: `f32(d)·q` per value, exactly as llama.cpp dequantizes,
/// then narrowed to `dtype`. One projection's worth of memory, alive while it is used.
pub(super) fn dequantize<B: Backend>(
    words: IntTensor<B>,
    scales: FloatTensor<B>,
    bits: usize,
    dtype: DType,
) -> FloatTensor<B> {
    let shape = words.shape();
    let (out, n_words) = (shape[0], shape[1]);
    let per_word = 32 / bits;
    let d_in = n_words * per_word;
    let mask = Scalar::Int((1i64 << bits) - 1);
    let values: Vec<IntTensor<B>> = (0..per_word)
        .map(|k| {
            let shifted = match k {
                0 => words.clone(),
                _ => B::bitwise_right_shift_scalar(words.clone(), Scalar::Int((k * bits) as i64)),
            };
            let value = B::bitwise_and_scalar(shifted, mask);
            B::int_reshape(value, Shape::new([out, n_words, 1]))
        })
        .collect();
    let q = B::int_into_float(B::int_cat(values, 2), FloatDType::F32);
    let q = B::float_sub_scalar(q, Scalar::Float((1u32 << (bits - 1)) as f64));
    let q = B::float_reshape(q, Shape::new([out, d_in / BLOCK, BLOCK]));
    let scales = B::float_cast(scales, FloatDType::F32);
    let scales = B::float_reshape(scales, Shape::new([out, d_in / BLOCK, 1]));
    let w = B::float_reshape(B::float_mul(q, scales), Shape::new([out, d_in]));
    match dtype {
        DType::F32 => w,
        other => B::float_cast(w, other.into()),
    }
}

/// `x: [.., in]` · Wᵀ → `[.., out]`, or with `input_grad` `x: [.., out]` · W → `[.., in]`, in
/// x's type, a panel of the result's columns at a time: their part of the weight (rows of W,
/// or whole blocks of its columns), about [`super::PANEL`] values, is dequantized, multiplied
/// and dropped. Each column is one product's, so the panels change no sum.
pub(super) fn linear<B: Backend>(
    x: FloatTensor<B>,
    words: IntTensor<B>,
    scales: FloatTensor<B>,
    bits: usize,
    input_grad: bool,
) -> FloatTensor<B> {
    let shape = x.shape();
    let dims = shape.num_dims();
    let rows = shape.num_elements() / shape[dims - 1];
    let x = B::float_reshape(x, Shape::new([rows, shape[dims - 1]]));
    let w_shape = words.shape();
    let (out, d_in) = (w_shape[0], w_shape[1] * 32 / bits);
    let (width, panel) = super::panels(out, d_in, input_grad, super::PANEL);
    let per_word = 32 / bits;
    let dtype = x.dtype();
    let products = (0..width).step_by(panel).map(|start| {
        let n = panel.min(width - start);
        let (words, scales) = match n < width {
            false => (words.clone(), scales.clone()),
            true => {
                let range = start..start + n;
                let words_part = part(range.clone(), input_grad, per_word);
                let scales_part = part(range, input_grad, BLOCK);
                (
                    B::int_slice(words.clone(), &words_part),
                    B::float_slice(scales.clone(), &scales_part),
                )
            }
        };
        let w = dequantize::<B>(words, scales, bits, dtype);
        match input_grad {
            false => B::float_matmul(x.clone(), B::float_transpose(w)),
            true => B::float_matmul(x.clone(), w),
        }
    });
    let y = B::float_cat(products.collect(), 1);
    let mut out_shape = shape.clone();
    out_shape[dims - 1] = width;
    B::float_reshape(y, out_shape)
}

/// Weight rows `range` (`columns = false`), or its columns `range` (whole blocks), as slices of
/// a `[out, ..]` tensor holding `per` weight values an entry.
fn part(range: Range<usize>, columns: bool, per: usize) -> [Slice; 2] {
    match columns {
        false => [Slice::from(range), Slice::full()],
        true => [
            Slice::full(),
            Slice::from(range.start / per..range.end / per),
        ],
    }
}
