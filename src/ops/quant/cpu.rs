//! The quantized projection on the CPU: the packed weight dequantized straight from flex's
//! buffers into one scratch matrix (rows in parallel), then one gemm. The default body's
//! dozen tensor operations (shifts, masks, a cat, casts) cost more than the product itself.
//!
//! A few rows (decoding: one per sequence) take another path: each weight row is dequantized
//! into a per-thread scratch row and dotted with the inputs at once, so the weight is read once
//! and no `[out, in]` matrix is written for a product that is a handful of dot products.

use std::ops::Range;

use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Flex, TensorMetadata};
use burn::tensor::{DType, FloatDType, Shape, TensorData};
use rayon::prelude::*;

use super::PANEL;
use super::QuantLinearBackend;
use super::blocks::BLOCK;
use crate::ops::gemm::{Matrix, contiguous, matmul};
use crate::ops::lanes;

/// Input rows at or below which `x · Wᵀ` dots each dequantized weight row with the inputs
/// directly: SmolLM2-135M at q4_0 decodes 36.9 tokens/s so against 24.2 through the gemm, and
/// 188.6 against 144.8 in batches of 16 (`BENCHMARKS.md`).
const DIRECT_ROWS: usize = 16;

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
    let shape = x.shape();
    let dims = shape.num_dims();
    let k = shape[dims - 1];
    let rows = shape.num_elements() / k;
    let x = contiguous(x);
    let x_data = &x.storage::<f32>()[x.layout().start_offset()..][..rows * k];
    let width = if input_grad { d_in } else { out };
    let y = if rows <= DIRECT_ROWS && !input_grad {
        direct(x_data, rows, words, scales, bits)
    } else {
        let x = Matrix::dense(x_data, rows, k);
        by_panels(x, &Packed::of(words, scales, bits), input_grad, PANEL)
    };
    let mut out_shape = shape.clone();
    out_shape[dims - 1] = width;
    FlexTensor::from_data(TensorData::new(y, Shape::from(out_shape.to_vec())))
}

/// `x · Wᵀ` for `rows` input rows `[rows, in]`, one weight row at a time: `[rows, out]`.
fn direct(
    x: &[f32],
    rows: usize,
    words: &FlexTensor,
    scales: &FlexTensor,
    bits: usize,
) -> Vec<f32> {
    let weight = Packed::of(words, scales, bits);
    let (out, d_in) = (weight.out, weight.d_in);
    // Output-major, so that each thread writes its own rows: `[out, rows]`.
    let mut yt = vec![0f32; out * rows];
    yt.par_chunks_mut(rows).enumerate().for_each_init(
        || vec![0f32; d_in],
        |row, (o, ys)| {
            weight.dequantize_row(o, row);
            for (r, y) in ys.iter_mut().enumerate() {
                *y = lanes::dot(row, &x[r * d_in..(r + 1) * d_in]) as f32;
            }
        },
    );
    (0..rows * out)
        .map(|i| yt[(i % out) * rows + i / out])
        .collect()
}

/// `x · Wᵀ` (`[rows, out]`), or `x · W` (`[rows, in]`) for the input's gradient, a panel of
/// the result's columns at a time: their part of the weight (rows of W for `x · Wᵀ`, whole
/// blocks of W's columns for `x · W`), about `values` values, is dequantized (`f32(d)·q` per
/// value, as llama.cpp does) into one scratch buffer and multiplied into them. Each column is
/// one gemm's, so the panels change no sum.
fn by_panels(x: Matrix, weight: &Packed, input_grad: bool, values: usize) -> Vec<f32> {
    let (out, d_in, rows) = (weight.out, weight.d_in, x.rows);
    let (width, panel) = super::panels(out, d_in, input_grad, values);
    let mut y = vec![0f32; rows * width];
    let mut scratch = vec![0f32; panel * x.cols];
    let mut columns = vec![0f32; if panel < width { rows * panel } else { 0 }];
    for start in (0..width).step_by(panel) {
        let n = panel.min(width - start);
        let w = &mut scratch[..n * x.cols];
        let w = match input_grad {
            false => {
                weight.dequantize(start..start + n, 0..d_in, w);
                Matrix::dense(w, n, d_in).t()
            }
            true => {
                weight.dequantize(0..out, start..start + n, w);
                Matrix::dense(w, out, n)
            }
        };
        if n == width {
            matmul(&mut y, x, w, false);
            continue;
        }
        let part = &mut columns[..rows * n];
        matmul(part, x, w, false);
        for (y_row, part_row) in y.chunks_exact_mut(width).zip(part.chunks_exact(n)) {
            y_row[start..start + n].copy_from_slice(part_row);
        }
    }
    y
}

/// A packed `[out, in]` weight read from flex's buffers, its scales widened to f32.
struct Packed {
    words: FlexTensor,
    scales: Vec<f32>,
    bits: usize,
    out: usize,
    d_in: usize,
}

impl Packed {
    fn of(words: &FlexTensor, scales: &FlexTensor, bits: usize) -> Self {
        let words = contiguous(words.clone());
        assert_eq!(words.dtype(), DType::I32, "packed words are i32");
        let w_shape = words.shape();
        let (out, d_in) = (w_shape[0], w_shape[1] * 32 / bits);
        Self {
            scales: widened(scales),
            words,
            bits,
            out,
            d_in,
        }
    }

    /// Weight row `o` into `row`.
    fn dequantize_row(&self, o: usize, row: &mut [f32]) {
        self.dequantize_part(o, 0..self.d_in, row);
    }

    /// Rows `rows` and columns `cols` (whole blocks) of the weight into `into`, row-major,
    /// rows in parallel.
    fn dequantize(&self, rows: Range<usize>, cols: Range<usize>, into: &mut [f32]) {
        into.par_chunks_mut(cols.len())
            .zip(rows)
            .for_each(|(row, o)| self.dequantize_part(o, cols.clone(), row));
    }

    /// Columns `cols` (whole blocks) of weight row `o` into `row`.
    fn dequantize_part(&self, o: usize, cols: Range<usize>, row: &mut [f32]) {
        match self.bits {
            4 => self.unpack::<4>(o, cols, row),
            8 => self.unpack::<8>(o, cols, row),
            bits => unreachable!("{bits}-bit values are not a block format"),
        }
    }

    /// [`Self::dequantize_part`] with the width known to the compiler: a block at a time, a
    /// word at a time, so that no value costs a division and the unpacking vectorises.
    fn unpack<const BITS: usize>(&self, o: usize, cols: Range<usize>, row: &mut [f32]) {
        let per_word = 32 / BITS;
        let n_words = cols.len() / per_word;
        let (mask, offset) = ((1u32 << BITS) - 1, 1i32 << (BITS - 1));
        let start = self.words.layout().start_offset() + (o * self.d_in + cols.start) / per_word;
        let row_words = &self.words.storage::<i32>()[start..][..n_words];
        let first = (o * self.d_in + cols.start) / BLOCK;
        let row_scales = &self.scales[first..first + cols.len() / BLOCK];
        let block_words = row_words.chunks_exact(BLOCK / per_word);
        for ((values, words), &d) in row.chunks_exact_mut(BLOCK).zip(block_words).zip(row_scales) {
            for (values, &word) in values.chunks_exact_mut(per_word).zip(words) {
                for (j, v) in values.iter_mut().enumerate() {
                    *v = d * ((((word as u32) >> (j * BITS)) & mask) as i32 - offset) as f32;
                }
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// Panels of 3 weight rows (the last one short) and of one block of its columns give the
    /// products of the whole weight, against f64 sums of the dequantized rows.
    #[test]
    fn panels_multiply_as_the_whole_weight() {
        let (out, d_in, rows, bits) = (40, 64, 5, 4);
        let mut rng = StdRng::seed_from_u64(7);
        let words: Vec<i32> = (0..out * d_in * bits / 32).map(|_| rng.random()).collect();
        let scales: Vec<f32> = (0..out * d_in / BLOCK).map(|_| rng.random()).collect();
        let words = FlexTensor::from_data(TensorData::new(words, [out, d_in * bits / 32]));
        let scales = FlexTensor::from_data(TensorData::new(scales, [out, d_in / BLOCK]));
        let weight = Packed::of(&words, &scales, bits);
        let mut w = vec![0f32; out * d_in];
        for (o, row) in w.chunks_exact_mut(d_in).enumerate() {
            weight.dequantize_row(o, row);
        }
        for input_grad in [false, true] {
            let (k, width) = if input_grad { (out, d_in) } else { (d_in, out) };
            let x: Vec<f32> = (0..rows * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let ours = by_panels(Matrix::dense(&x, rows, k), &weight, input_grad, 3 * d_in);
            for (i, &y) in ours.iter().enumerate() {
                let (r, c) = (i / width, i % width);
                let expected: f64 = (0..k)
                    .map(|j| {
                        let w = if input_grad {
                            w[j * d_in + c]
                        } else {
                            w[c * d_in + j]
                        };
                        x[r * k + j] as f64 * w as f64
                    })
                    .sum();
                let tol = 1e-5 * (1.0 + expected.abs());
                assert!(
                    (y as f64 - expected).abs() <= tol,
                    "{input_grad}: {y} against {expected}"
                );
            }
        }
    }
}
