//! Rotary position embeddings in Hugging Face's rotate-half convention.
//!
//! HF checkpoints pair feature `i` with feature `i + d/2` of each head (burn's `RotaryEncoding`
//! pairs neighbours instead), so implementing rotate-half here lets q/k weights load unpermuted
//! and lets LoRA factors export without un-permutation.

use burn::tensor::{Device, Tensor, TensorData};

use super::config::{Llama3RopeScaling, ModelConfig};

/// The inverse frequencies of one head's rotation, with any Llama-3 scaling applied.
#[derive(Debug, Clone)]
pub struct RotaryHalf {
    inv_freq: Vec<f32>,
}

impl RotaryHalf {
    /// The tables' frequencies for `config` (Llama 3 scaling included).
    pub fn new(config: &ModelConfig) -> Self {
        let d = config.head_dim;
        // Computed as transformers does: in f32, theta^(-2i/d).
        let mut inv_freq: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / (config.rope_theta as f32).powf((2 * i) as f32 / d as f32))
            .collect();
        if let Some(scaling) = &config.rope_scaling {
            inv_freq = llama3_scale(&inv_freq, scaling);
        }
        Self { inv_freq }
    }

    /// cos and sin tables of shape `[len, head_dim]` for positions `start..start + len`.
    pub fn tables(&self, start: usize, len: usize, device: &Device) -> (Tensor<2>, Tensor<2>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(len * 2 * half);
        let mut sin = Vec::with_capacity(len * 2 * half);
        for pos in start..start + len {
            let angles: Vec<f32> = self.inv_freq.iter().map(|f| pos as f32 * f).collect();
            // Both halves of a head share the same angles.
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        let shape = [len, 2 * half];
        (
            Tensor::from_data(TensorData::new(cos, shape), device),
            Tensor::from_data(TensorData::new(sin, shape), device),
        )
    }

    /// cos and sin tables `[batch, 1, len, head_dim]` for per-sequence `positions` (row-major
    /// `[batch, len]`), as decoding with left padding needs.
    pub fn tables_at(
        &self,
        positions: &[usize],
        batch: usize,
        device: &Device,
    ) -> (Tensor<4>, Tensor<4>) {
        let len = positions.len() / batch.max(1);
        let d = 2 * self.inv_freq.len();
        let (mut cos, mut sin) = (
            Vec::with_capacity(positions.len() * d),
            Vec::with_capacity(positions.len() * d),
        );
        for &pos in positions {
            for _ in 0..2 {
                cos.extend(self.inv_freq.iter().map(|f| (pos as f32 * f).cos()));
                sin.extend(self.inv_freq.iter().map(|f| (pos as f32 * f).sin()));
            }
        }
        let shape = [batch, 1, len, d];
        (
            Tensor::from_data(TensorData::new(cos, shape), device),
            Tensor::from_data(TensorData::new(sin, shape), device),
        )
    }

    /// Rotates `x: [batch, heads, len, head_dim]` by per-sequence tables `[batch, 1, len, head_dim]`.
    pub fn apply_batched(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
        let [b, h, s, d] = x.dims();
        let x1 = x.clone().narrow(3, 0, d / 2);
        let x2 = x.clone().narrow(3, d / 2, d / 2);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * cos.clone().expand([b, h, s, d]) + rotated * sin.clone().expand([b, h, s, d])
    }

    /// Rotates `x: [batch, heads, len, head_dim]` by the tables of `tables`.
    pub fn apply(x: Tensor<4>, cos: &Tensor<2>, sin: &Tensor<2>) -> Tensor<4> {
        let [b, h, s, d] = x.dims();
        let x1 = x.clone().narrow(3, 0, d / 2);
        let x2 = x.clone().narrow(3, d / 2, d / 2);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        let cos = cos.clone().unsqueeze::<4>().expand([b, h, s, d]);
        let sin = sin.clone().unsqueeze::<4>().expand([b, h, s, d]);
        x * cos + rotated * sin
    }
}

/// Llama-3's frequency-dependent scaling: long wavelengths are slowed by `factor`, short ones kept,
/// and the band between is interpolated (transformers' `_compute_llama3_parameters`).
fn llama3_scale(inv_freq: &[f32], s: &Llama3RopeScaling) -> Vec<f32> {
    let old_len = s.original_max_position_embeddings as f32;
    let (factor, low, high) = (
        s.factor as f32,
        s.low_freq_factor as f32,
        s.high_freq_factor as f32,
    );
    let low_freq_wavelen = old_len / low;
    let high_freq_wavelen = old_len / high;
    inv_freq
        .iter()
        .map(|&f| {
            let wavelen = 2.0 * std::f32::consts::PI / f;
            if wavelen < high_freq_wavelen {
                f
            } else if wavelen > low_freq_wavelen {
                f / factor
            } else {
                let smooth = (old_len / wavelen - low) / (high - low);
                (1.0 - smooth) * f / factor + smooth * f
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_and_slows_low_frequencies() {
        let s = Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        };
        let scaled = llama3_scale(&[1.0, 0.2, 0.001], &s);
        assert_eq!(scaled[0], 1.0); // wavelength 6.3 < 16
        assert!((scaled[2] - 0.001 / 8.0).abs() < 1e-9); // wavelength 6283 > 64
        assert!(scaled[1] < 0.2 && scaled[1] > 0.2 / 8.0); // wavelength 31.4: interpolated
    }
}
