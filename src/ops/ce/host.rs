//! The fused loss on the host: the kernels' arithmetic, one row per task. Used by the CPU
//! backend and by any non-wgpu device; it never allocates more than the gradient it returns.
//!
//! A row is visited in the vectorised passes of `crate::ops::lanes` (glibc's `expf` and a sequential
//! f32 sum take one value at a time), which made the CPU loss several times faster.

use burn::backend::Backend;
use burn::backend::TensorMetadata;
use burn::backend::tensor::FloatTensor;
use burn::tensor::TensorData;
use rayon::prelude::*;

use crate::ops::lanes::{exp_sum, row_max, row_sum, scaled_exp, scaled_exp_in_place};

pub fn read<B: Backend>(t: FloatTensor<B>) -> Vec<f32> {
    pollster::block_on(B::float_into_data(t))
        .expect("tensor read-back")
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data")
}

pub struct Row {
    target: usize,
    eps: f32,
    counted: bool,
}

pub fn rows_of(labels: &[f32]) -> Vec<Row> {
    labels
        .chunks_exact(3)
        .map(|l| Row {
            target: l[0] as usize,
            eps: l[1],
            counted: l[2] != 0.0,
        })
        .collect()
}

pub fn forward<B: Backend>(logits: FloatTensor<B>, labels: FloatTensor<B>) -> FloatTensor<B> {
    let device = logits.device();
    let [rows, vocab] = [logits.shape()[0], logits.shape()[1]];
    let z = read::<B>(logits);
    let stats = stats(&z, vocab, &rows_of(&read::<B>(labels)));
    B::float_from_data(TensorData::new(stats, [rows, 2]), &device)
}

/// `[loss, lse]` of each row of `z` (row-major, `vocab` wide); zeros for masked rows.
pub fn stats(z: &[f32], vocab: usize, labels: &[Row]) -> Vec<f32> {
    z.par_chunks_exact(vocab)
        .zip(labels.par_iter())
        .flat_map_iter(|(z, row)| {
            if !row.counted {
                return [0.0, 0.0];
            }
            let max = row_max(z);
            row_stats(z, row, max, exp_sum(z, max))
        })
        .collect()
}

/// `[loss, lse]` of a counted row from its max and Σexp(z − max).
fn row_stats(z: &[f32], row: &Row, max: f32, exp_sum: f64) -> [f32; 2] {
    let lse = (max as f64 + exp_sum.ln()) as f32;
    let mean = (row_sum(z) / z.len() as f64) as f32;
    let loss = (1.0 - row.eps) * (lse - z[row.target]) + row.eps * (lse - mean);
    [loss, lse]
}

/// [`stats`] of each row of `z` while `z` is overwritten by the gradient for `grad_stats`:
/// every pass over a row runs while it is in cache, where a forward and then a backward would
/// each stream the whole block from memory.
pub fn stats_and_grad_in_place(
    z: &mut [f32],
    vocab: usize,
    labels: &[Row],
    grad_stats: &[f32],
) -> Vec<f32> {
    z.par_chunks_exact_mut(vocab)
        .zip(labels.par_iter())
        .enumerate()
        .flat_map_iter(|(r, (z, row))| {
            if !row.counted {
                z.fill(0.0);
                return [0.0, 0.0];
            }
            let max = row_max(z);
            let exp_sum = exp_sum(z, max);
            // The loss reads the logits, so it is formed before they are overwritten.
            let stats = row_stats(z, row, max, exp_sum);
            let (g_loss, g_lse) = (grad_stats[2 * r], grad_stats[2 * r + 1]);
            let scale = ((g_loss + g_lse) as f64 / exp_sum) as f32;
            let uniform = g_loss * row.eps / vocab as f32;
            scaled_exp_in_place(z, max, scale, uniform);
            z[row.target] -= g_loss * (1.0 - row.eps);
            stats
        })
        .collect()
}

pub fn backward<B: Backend>(
    logits: FloatTensor<B>,
    labels: FloatTensor<B>,
    stats: FloatTensor<B>,
    grad_stats: FloatTensor<B>,
) -> FloatTensor<B> {
    let device = logits.device();
    let dtype = logits.dtype();
    let shape = logits.shape();
    let vocab = shape[1];
    let z = read::<B>(logits);
    let mut grad = vec![0f32; z.len()];
    let labels = rows_of(&read::<B>(labels));
    write_grad(
        &z,
        &mut grad,
        vocab,
        &labels,
        &read::<B>(stats),
        &read::<B>(grad_stats),
    );
    let data = TensorData::new(grad, shape).convert_dtype(dtype);
    B::float_from_data(data, &device)
}

/// [`write_grad`] with the logits' buffer overwritten by the gradient.
pub fn write_grad_in_place(
    z: &mut [f32],
    vocab: usize,
    labels: &[Row],
    stats: &[f32],
    grad_stats: &[f32],
) {
    z.par_chunks_exact_mut(vocab)
        .enumerate()
        .for_each(|(r, g)| grad_row(g, None, r, vocab, labels, stats, grad_stats));
}

/// `grad = g_loss·(softmax(z) − q) + g_lse·softmax(z)` per row, from the saved lse.
pub fn write_grad(
    z: &[f32],
    grad: &mut [f32],
    vocab: usize,
    labels: &[Row],
    stats: &[f32],
    grad_stats: &[f32],
) {
    grad.par_chunks_exact_mut(vocab)
        .zip(z.par_chunks_exact(vocab))
        .enumerate()
        .for_each(|(r, (g, z))| grad_row(g, Some(z), r, vocab, labels, stats, grad_stats));
}

/// One row of the gradient into `g`, reading the logits from `z`, or from `g` itself.
fn grad_row(
    g: &mut [f32],
    z: Option<&[f32]>,
    r: usize,
    vocab: usize,
    labels: &[Row],
    stats: &[f32],
    grad_stats: &[f32],
) {
    let row = &labels[r];
    if !row.counted {
        g.fill(0.0);
        return;
    }
    let (g_loss, g_lse, lse) = (grad_stats[2 * r], grad_stats[2 * r + 1], stats[2 * r + 1]);
    let uniform = g_loss * row.eps / vocab as f32;
    let scale = g_loss + g_lse;
    match z {
        Some(z) => scaled_exp(g, z, lse, scale, uniform),
        None => scaled_exp_in_place(g, lse, scale, uniform),
    }
    g[row.target] -= g_loss * (1.0 - row.eps);
}

/// The `[rows, 2]` upstream gradient of the weighted loss sum with respect to each row's
/// statistics `(loss, lse)`: the row's weight for its loss, 0 for its lse. `labels` are the
/// packed `[rows, 3]` (target, ε, weight).
pub fn loss_only_upstream(labels: &[f32]) -> Vec<f32> {
    labels.chunks_exact(3).flat_map(|l| [l[2], 0.0]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pass_matches_forward_then_backward() {
        // Two rows of 1,000 logits, one with label smoothing, and a masked row; upstream
        // gradients other than (1, 0), so both terms of the gradient are exercised.
        let vocab = 1_000;
        let z: Vec<f32> = (0..3 * vocab)
            .map(|i| ((i * 2_654_435_761usize) % 1000) as f32 / 100.0 - 5.0)
            .collect();
        let labels = rows_of(&[3.0, 0.0, 1.0, 999.0, 0.3, 1.0, 5.0, 0.1, 0.0]);
        let grad_stats = [0.7, 0.2, -1.5, 0.4, 1.0, 1.0];
        let stats_two = stats(&z, vocab, &labels);
        let mut grad_two = vec![0.0; z.len()];
        write_grad(&z, &mut grad_two, vocab, &labels, &stats_two, &grad_stats);
        let mut grad_one = z.clone();
        let stats_one = stats_and_grad_in_place(&mut grad_one, vocab, &labels, &grad_stats);
        // Same arithmetic up to f32 rounding of exp(z − lse) against exp(z − max) / Σ.
        for (a, b) in stats_one.iter().zip(&stats_two) {
            assert!((a - b).abs() < 1e-6, "stats {a} vs {b}");
        }
        for (a, b) in grad_one.iter().zip(&grad_two) {
            assert!((a - b).abs() < 1e-7, "gradient {a} vs {b}");
        }
        assert!(grad_one[2 * vocab..].iter().all(|&g| g == 0.0));
    }
}
