//! A batch on a device: padded ids, and the rows of the flattened hidden states that carry loss
//! with their labels.

use anyhow::Result;
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::RowLabels;
use crate::data::batch::{Reduction, Sample};

/// A right-padded batch on a device, with the flat indices of the rows that carry loss.
pub struct Batch {
    /// `[batch, len]` token ids.
    pub ids: Tensor<2, Int>,
    /// Row `b * len + t` of the flattened hidden states predicts `labels.targets()[i]`.
    pub rows: Tensor<1, Int>,
    /// Targets, ε and weights of the loss rows.
    pub labels: RowLabels,
    /// Tokens in the batch, padding excluded.
    pub tokens: usize,
}

impl Batch {
    /// A batch whose loss tokens all weigh the same.
    pub fn new(samples: &[&Sample], device: &Device) -> Result<Self> {
        Self::with_reduction(samples, Reduction::Tokens, device)
    }

    /// A batch whose loss tokens weigh as `reduction` says ([`Sample::row_weight`]).
    pub fn with_reduction(
        samples: &[&Sample],
        reduction: Reduction,
        device: &Device,
    ) -> Result<Self> {
        let len = samples.iter().map(|s| s.ids.len()).max().unwrap_or(1);
        let mut ids = vec![0i64; samples.len() * len];
        let (mut rows, mut targets, mut smoothing) = (Vec::new(), Vec::new(), Vec::new());
        let mut weights = Vec::new();
        for (b, s) in samples.iter().enumerate() {
            for (t, &id) in s.ids.iter().enumerate() {
                ids[b * len + t] = id as i64;
            }
            // Position t - 1 predicts token t; the first token is never a target.
            for t in (1..s.ids.len()).filter(|&t| s.loss_mask[t]) {
                rows.push((b * len + t - 1) as i64);
                targets.push(s.ids[t]);
                smoothing.push(s.smoothing);
                weights.push(s.row_weight(reduction));
            }
        }
        let n = rows.len();
        Ok(Self {
            ids: Tensor::from_data(TensorData::new(ids, [samples.len(), len]), device),
            rows: Tensor::from_data(TensorData::new(rows, [n]), device),
            labels: RowLabels::weighted(targets, smoothing, weights)?,
            tokens: samples.iter().map(|s| s.ids.len()).sum(),
        })
    }
}
