//! Passes over a row that the compiler vectorises: maxima, sums and exponentials in lanes.
//!
//! glibc's `expf` and a sequential f32 sum take one value at a time. Written in [`LANES`]
//! independent lanes, with an `exp` the compiler can inline, the same passes run
//! several times faster; the CPU loss and attention are made of them.

use multiversion::multiversion;

/// Independent accumulators: enough for the widest vector unit to add without waiting.
const LANES: usize = 16;
/// Values summed in f32 before the running total is carried in f64: a sequential f32 sum over
/// 10^5 entries would lose the 1e-5 relative accuracy we promise.
const BLOCK: usize = 1024;

// The row passes below are compiled once per SIMD level (SSE2 … AVX-512) and picked at run
// time, as the matmul is: the portable build alone would use 4 of AVX-512's 16 lanes.

/// The largest entry of a row.
#[multiversion(targets = "simd")]
pub fn row_max(z: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = z.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            // Not `f32::max`: its NaN rule keeps the compiler from using the vector max.
            *m = if v > *m { v } else { *m };
        }
    }
    let tail = chunks.remainder().iter().copied();
    lanes
        .into_iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, f32::max)
}

/// Σ z.
#[multiversion(targets = "simd")]
pub fn row_sum(z: &[f32]) -> f64 {
    lane_sum(z, |v| v)
}

/// Σ exp(z − shift).
#[multiversion(targets = "simd")]
pub fn exp_sum(z: &[f32], shift: f32) -> f64 {
    lane_sum(z, |v| exp(v - shift))
}

/// `g = scale · exp(z − shift) − uniform`.
#[multiversion(targets = "simd")]
pub fn scaled_exp(g: &mut [f32], z: &[f32], shift: f32, scale: f32, uniform: f32) {
    for (g, &z) in g.iter_mut().zip(z) {
        *g = scale * exp(z - shift) - uniform;
    }
}

/// [`scaled_exp`] of `g` in place.
#[multiversion(targets = "simd")]
pub fn scaled_exp_in_place(g: &mut [f32], shift: f32, scale: f32, uniform: f32) {
    for g in g.iter_mut() {
        *g = scale * exp(*g - shift) - uniform;
    }
}

/// `z = exp((z − shift)·factor)` in place, returning the new Σ z: a softmax row's numerators
/// and their sum in one pass.
#[multiversion(targets = "simd")]
pub fn exp_in_place(z: &mut [f32], shift: f32, factor: f32) -> f64 {
    lane_sum_in_place(z, |v| exp((v - shift) * factor))
}

/// `z = z · factor`.
#[multiversion(targets = "simd")]
pub fn scale_in_place(z: &mut [f32], factor: f32) {
    for v in z.iter_mut() {
        *v *= factor;
    }
}

/// Σ a·b.
#[multiversion(targets = "simd")]
pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "dot of unequal rows");
    a.chunks(BLOCK)
        .zip(b.chunks(BLOCK))
        .map(|(a, b)| {
            let mut lanes = [0f32; LANES];
            let (mut ca, mut cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
            for (x, y) in (&mut ca).zip(&mut cb) {
                for ((s, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
                    *s += x * y;
                }
            }
            let tail: f32 = ca
                .remainder()
                .iter()
                .zip(cb.remainder())
                .map(|(x, y)| x * y)
                .sum();
            lanes.iter().sum::<f32>() as f64 + tail as f64
        })
        .sum()
}

/// `d = p · (d − shift) · factor`: a softmax row's backward, with `d` the gradient of the
/// probabilities `p` and `shift` = Σ p·d.
#[multiversion(targets = "simd")]
pub fn softmax_grad_in_place(d: &mut [f32], p: &[f32], shift: f32, factor: f32) {
    for (d, &p) in d.iter_mut().zip(p) {
        *d = p * (*d - shift) * factor;
    }
}

/// Σ f(z): [`LANES`] f32 partial sums over blocks of [`BLOCK`] values, carried in f64.
#[inline(always)]
fn lane_sum(z: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    z.chunks(BLOCK)
        .map(|block| {
            let mut lanes = [0f32; LANES];
            let mut chunks = block.chunks_exact(LANES);
            for chunk in &mut chunks {
                for (s, &v) in lanes.iter_mut().zip(chunk) {
                    *s += f(v);
                }
            }
            let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
            lanes.iter().sum::<f32>() as f64 + tail as f64
        })
        .sum()
}

/// [`lane_sum`] that also writes each f(z) back into z.
#[inline(always)]
fn lane_sum_in_place(z: &mut [f32], f: impl Fn(f32) -> f32) -> f64 {
    z.chunks_mut(BLOCK)
        .map(|block| {
            let mut lanes = [0f32; LANES];
            let mut chunks = block.chunks_exact_mut(LANES);
            for chunk in &mut chunks {
                for (s, v) in lanes.iter_mut().zip(chunk) {
                    *v = f(*v);
                    *s += *v;
                }
            }
            let mut tail = 0f32;
            for v in chunks.into_remainder() {
                *v = f(*v);
                tail += *v;
            }
            lanes.iter().sum::<f32>() as f64 + tail as f64
        })
        .sum()
}

/// e^x in a form the compiler vectorises: x = n·ln 2 + r with |r| ≤ ln 2 / 2, e^r by Cephes'
/// degree-7 polynomial (relative error under 2·10⁻⁷ on that range) and 2^n written into the
/// exponent bits. Below −87.3 the result is the smallest normal float instead of a subnormal
/// or 0: the loss only exponentiates z − max ≤ 0, where that is a rounding error of ~10⁻³⁸.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2²³ rounds to the nearest integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.336_55, 88.376_26);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    let n = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    e_r * f32::from_bits(((n + 127) << 23) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_the_standard_library() {
        // Relative error against libm's expf over the range the loss uses (and beyond): 4e-7
        // covers the polynomial (2e-7) and the rounding of r.
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (ours, std) = (exp(x), x.exp());
            worst = worst.max(((ours - std) / std).abs());
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1.2e-38 && exp(-1000.0) > 0.0);
        assert!(exp(f32::NEG_INFINITY) < 1.2e-38);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn lane_sums_and_max_see_every_value() {
        // 2,500 values: two full blocks, a partial one and a tail shorter than the lanes.
        let z: Vec<f32> = (0..2_500).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        let expected: f64 = z.iter().map(|&v| v as f64).sum();
        assert!((row_sum(&z) - expected).abs() < 1e-3);
        assert!(
            (exp_sum(&z, 50.0) - z.iter().map(|&v| ((v - 50.0) as f64).exp()).sum::<f64>()).abs()
                < 1e-5
        );
        assert_eq!(row_max(&z), 50.0);
        assert_eq!(row_max(&[-3.0, -1.0, -2.0]), -1.0);
        let w: Vec<f32> = z.iter().map(|v| v / 25.0).collect();
        let expected: f64 = z.iter().zip(&w).map(|(&a, &b)| a as f64 * b as f64).sum();
        // w = z / 25, so every product is ≥ 0 and 1e-5 relative is f32 rounding, not cancellation.
        assert!((dot(&z, &w) - expected).abs() < 1e-5 * expected);
    }

    #[test]
    fn softmax_passes_match_the_formulas() {
        // exp((z − 2)·0.5) in place with its sum; then the softmax backward of a gradient row.
        let z: Vec<f32> = (0..1_030)
            .map(|i| ((i * 13) % 29) as f32 / 7.0 - 2.0)
            .collect();
        let mut e = z.clone();
        let sum = exp_in_place(&mut e, 2.0, 0.5);
        let expected: Vec<f64> = z.iter().map(|&v| ((v as f64 - 2.0) * 0.5).exp()).collect();
        assert!((sum - expected.iter().sum::<f64>()).abs() < 1e-6 * sum);
        for (a, b) in e.iter().zip(&expected) {
            assert!((*a as f64 - b).abs() < 4e-7 * b, "{a} vs {b}");
        }
        scale_in_place(&mut e, 2.0);
        assert!((e[5] as f64 - 2.0 * expected[5]).abs() < 1e-6 * expected[5]);
        let mut d: Vec<f32> = (0..1_030).map(|i| (i % 5) as f32 - 2.0).collect();
        let (p, d0) = (e.clone(), d.clone());
        softmax_grad_in_place(&mut d, &p, 0.25, 3.0);
        for ((g, p), d) in d.iter().zip(&p).zip(&d0) {
            assert!((g - p * (d - 0.25) * 3.0).abs() <= 1e-6 * g.abs().max(1.0));
        }
    }
}
