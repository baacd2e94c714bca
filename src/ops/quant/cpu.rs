//! The quantized projection on the CPU: the packed weight dequantized straight from flex's
//! buffers into one scratch matrix (rows in parallel), then one gemm. The default body's
//! dozen tensor operations (shifts, masks, a cat, casts) cost more than the product itself.

use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Flex, TensorMetadata};
use burn::tensor::{DType, FloatDType, Shape, TensorData};
use rayon::prelude::*;

use super::QuantLinearBackend;
use super::blocks::BLOCK;
use crate::ops::gemm::{Matrix, contiguous, matmul};

impl QuantLinearBackend for Flex {
    fn ual_qlinear(
        x: FlexTensor,
        words: FlexTensor,
        scales: FlexTensor,
        bits: usize,
    ) -> FlexTensor {
        linear(x, &words, &scales, bits, false)
    }

    fn ual_qlinear_input_grad(
        g: FlexTensor,
        words: FlexTensor,
        scales: FlexTensor,
        bits: usize,
    ) -> FlexTensor {
        linear(g, &words, &scales, bits, true)
    }
}

/// `x · Wᵀ`, or `x · W` for the input's gradient, in x's type (a half input is widened: the
/// CPU has no half arithmetic to gain from).
fn linear(
    x: FlexTensor,
    words: &FlexTensor,
    scales: &FlexTensor,
    bits: usize,
    input_grad: bool,
) -> FlexTensor {
    let dtype = x.dtype();
    if dtype != DType::F32 {
        let wide = cast(x, FloatDType::F32);
        let y = linear(wide, words, scales, bits, input_grad);
        return cast(y, dtype.into());
    }
    let w_shape = words.shape();
    let (out, d_in) = (w_shape[0], w_shape[1] * 32 / bits);
    let w = dequantize(words, scales, bits);
    let w = Matrix::dense(&w, out, d_in);
    let (w, width) = if input_grad { (w, d_in) } else { (w.t(), out) };
    let shape = x.shape();
    let dims = shape.num_dims();
    let k = shape[dims - 1];
    let rows = shape.num_elements() / k;
    let x = contiguous(x);
    let x_data = &x.storage::<f32>()[x.layout().start_offset()..][..rows * k];
    let mut y = vec![0f32; rows * width];
    matmul(&mut y, Matrix::dense(x_data, rows, k), w, false);
    let mut out_shape = shape.clone();
    out_shape[dims - 1] = width;
    FlexTensor::from_data(TensorData::new(y, Shape::from(out_shape.to_vec())))
}

/// `[out, in]` row-major f32: `f32(d)·q` per value, as llama.cpp dequantizes.
fn dequantize(words: &FlexTensor, scales: &FlexTensor, bits: usize) -> Vec<f32> {
    let words = contiguous(words.clone());
    let scales = widened(scales);
    let w_shape = words.shape();
    let (out, n_words) = (w_shape[0], w_shape[1]);
    let per_word = 32 / bits;
    let d_in = n_words * per_word;
    let (mask, offset) = ((1u32 << bits) - 1, 1i32 << (bits - 1));
    assert_eq!(words.dtype(), DType::I32, "packed words are i32");
    let packed = &words.storage::<i32>()[words.layout().start_offset()..][..out * n_words];
    let mut w = vec![0f32; out * d_in];
    w.par_chunks_mut(d_in).enumerate().for_each(|(r, row)| {
        let row_words = &packed[r * n_words..(r + 1) * n_words];
        let row_scales = &scales[r * (d_in / BLOCK)..(r + 1) * (d_in / BLOCK)];
        for (i, value) in row.iter_mut().enumerate() {
            let word = row_words[i / per_word] as u32;
            let q = ((word >> ((i % per_word) * bits)) & mask) as i32 - offset;
            *value = row_scales[i / BLOCK] * q as f32;
        }
    });
    w
}

/// The block scales as f32 (f16 widens exactly).
fn widened(scales: &FlexTensor) -> Vec<f32> {
    let scales = contiguous(scales.clone());
    let n = scales.shape().num_elements();
    let start = scales.layout().start_offset();
    match scales.dtype() {
        DType::F16 => scales.storage::<half::f16>()[start..][..n]
            .iter()
            .map(|s| s.to_f32())
            .collect(),
        _ => {
            let wide = cast(scales, FloatDType::F32);
            let start = wide.layout().start_offset();
            wide.storage::<f32>()[start..][..n].to_vec()
        }
    }
}

fn cast(t: FlexTensor, dtype: FloatDType) -> FlexTensor {
    generic_cast::<Flex>(t, dtype)
}

fn generic_cast<B: Backend>(t: FloatTensor<B>, dtype: FloatDType) -> FloatTensor<B> {
    B::float_cast(t, dtype)
}
