//! The UAL loss (ARCHITECTURE §3): cross-entropy with a per-row label-smoothing value ε, over the
//! rows a mask selects.
//!
//! For a row with target y, logits z and lse = log Σ_k exp z_k, the target distribution is
//! q = (1 − ε)·onehot(y) + ε/V (PyTorch's convention) and
//!
//! ```text
//! loss = (1 − ε)·(lse − z_y) + ε·(lse − mean_k z_k)        ∂loss/∂z = softmax(z) − q
//! ```
//!
//! [`ual_loss_sum`] returns the *weighted sum* over counted rows and the count, because the
//! reduction spans an optimizer step, across gradient-accumulation micro-batches: callers
//! divide by the step's total (`data::batch::Reduction`), not by each micro-batch's own count. A row's
//! weight is 1 when every token weighs the same, and 1/n_i when every sample does.

mod batch;
pub mod head;
pub mod linear;
pub mod objective;
pub mod reference;

use anyhow::{Result, bail};
use burn::tensor::{DType, Device, Tensor, TensorData};

pub use batch::Batch;
pub use head::{HeadBlocks, HeadPlan};
pub use linear::ual_linear_loss_sum;

/// Per-row targets, smoothing values, mask and weights, validated at the API boundary.
#[derive(Debug, Clone, PartialEq)]
pub struct RowLabels {
    targets: Vec<u32>,
    smoothing: Vec<f32>,
    mask: Vec<bool>,
    /// Each counted row's weight in the sum; `None` = all 1.
    weights: Option<Vec<f32>>,
}

impl RowLabels {
    /// Checks lengths and that every ε lies in [0, 1).
    pub fn new(targets: Vec<u32>, smoothing: Vec<f32>, mask: Vec<bool>) -> Result<Self> {
        if smoothing.len() != targets.len() || mask.len() != targets.len() {
            bail!(
                "UAL loss: {} targets, {} smoothing values and {} mask values must have one length",
                targets.len(),
                smoothing.len(),
                mask.len()
            );
        }
        if let Some((row, eps)) = smoothing
            .iter()
            .enumerate()
            .find(|(_, e)| !(0.0..1.0).contains(*e))
        {
            bail!("UAL loss: smoothing {eps} at row {row} is outside [0, 1)");
        }
        Ok(Self {
            targets,
            smoothing,
            mask,
            weights: None,
        })
    }

    /// Every row counted, row r weighing `weights[r]` (finite, > 0) in the summed loss.
    pub fn weighted(targets: Vec<u32>, smoothing: Vec<f32>, weights: Vec<f32>) -> Result<Self> {
        let n = targets.len();
        if weights.len() != n {
            bail!("UAL loss: {n} targets but {} weights", weights.len());
        }
        if let Some((row, w)) = weights
            .iter()
            .enumerate()
            .find(|(_, w)| !(w.is_finite() && **w > 0.0))
        {
            bail!("UAL loss: weight {w} at row {row} is not a positive number");
        }
        let mut labels = Self::new(targets, smoothing, vec![true; n])?;
        labels.weights = weights.iter().any(|&w| w != 1.0).then_some(weights);
        Ok(labels)
    }

    /// Every row counted, with one ε for all (ε = 0 is plain cross-entropy).
    pub fn uniform(targets: Vec<u32>, eps: f32) -> Result<Self> {
        let n = targets.len();
        Self::new(targets, vec![eps; n], vec![true; n])
    }

    /// The labels of rows `range`.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Self {
        Self {
            targets: self.targets[range.clone()].to_vec(),
            smoothing: self.smoothing[range.clone()].to_vec(),
            mask: self.mask[range.clone()].to_vec(),
            weights: self.weights.as_ref().map(|w| w[range].to_vec()),
        }
    }

    /// Each row's weight: 0 where masked.
    pub fn weights(&self) -> Vec<f32> {
        (0..self.rows())
            .map(|r| match (&self.weights, self.mask[r]) {
                (_, false) => 0.0,
                (Some(w), true) => w[r],
                (None, true) => 1.0,
            })
            .collect()
    }

    /// Whether some row weighs other than 0 or 1.
    pub fn is_weighted(&self) -> bool {
        self.weights.is_some()
    }

    /// Rows, counted or not.
    pub fn rows(&self) -> usize {
        self.targets.len()
    }

    /// How many rows the mask counts.
    pub fn count(&self) -> usize {
        self.mask.iter().filter(|&&m| m).count()
    }

    /// Each row's target id.
    pub fn targets(&self) -> &[u32] {
        &self.targets
    }

    /// Each row's ε.
    pub fn smoothing(&self) -> &[f32] {
        &self.smoothing
    }

    /// Whether each row counts.
    pub fn mask(&self) -> &[bool] {
        &self.mask
    }

    /// The `[rows, 3]` f32 tensor (target, ε, weight) the fused kernels read. The kernels only
    /// ask whether the weight is 0 (a masked row); the fused head's sum and upstream gradient
    /// apply it. Ids below 2^24 are exact in f32, far above any vocabulary ual supports.
    pub(crate) fn packed(&self, device: &Device) -> Tensor<2> {
        let weights = self.weights();
        let values: Vec<f32> = (0..self.rows())
            .flat_map(|r| [self.targets[r] as f32, self.smoothing[r], weights[r]])
            .collect();
        Tensor::from_data(
            TensorData::new(values, [self.rows(), 3]),
            (device, DType::F32),
        )
    }

    pub(crate) fn check_against(&self, logits_dims: [usize; 2]) -> Result<()> {
        let [rows, vocab] = logits_dims;
        if rows != self.rows() {
            bail!(
                "UAL loss: logits have {rows} rows but labels have {}",
                self.rows()
            );
        }
        if !(2..1 << 24).contains(&vocab) {
            bail!("UAL loss: vocabulary size {vocab} is outside [2, 2^24)");
        }
        if let Some((row, t)) = self
            .targets
            .iter()
            .enumerate()
            .find(|(_, t)| **t as usize >= vocab)
        {
            bail!("UAL loss: target {t} at row {row} is outside the vocabulary of {vocab}");
        }
        Ok(())
    }
}

/// The weighted loss summed over counted rows, and how many rows were counted.
pub struct LossSum {
    /// Shape `[1]`; differentiable with respect to the logits.
    pub sum: Tensor<1>,
    /// Rows counted.
    pub count: usize,
}

/// The UAL loss summed over counted rows, computed by the fused kernels (WGSL on wgpu, a
/// tuned loop on the CPU) with a hand-written backward.
pub fn ual_loss_sum(logits: Tensor<2>, labels: &RowLabels) -> Result<LossSum> {
    let device = logits.device();
    let mut per_row = ual_row_losses(logits, labels)?;
    if labels.is_weighted() {
        let weights = labels.weights();
        let n = weights.len();
        per_row = per_row * Tensor::<1>::from_data(TensorData::new(weights, [n]), &device);
    }
    Ok(LossSum {
        sum: per_row.sum(),
        count: labels.count(),
    })
}

/// The fused per-row losses `[rows]` (zero on masked rows, unweighted), for callers that
/// report per sample.
pub fn ual_row_losses(logits: Tensor<2>, labels: &RowLabels) -> Result<Tensor<1>> {
    labels.check_against(logits.dims())?;
    let packed = labels.packed(&logits.device());
    Ok(crate::ops::ce::row_losses(logits, packed))
}

/// The mean UAL loss over counted rows; 0 (not NaN) when nothing is counted.
pub fn ual_loss_mean(logits: Tensor<2>, labels: &RowLabels) -> Result<Tensor<1>> {
    let LossSum { sum, count } = ual_loss_sum(logits, labels)?;
    Ok(sum.div_scalar(count.max(1) as f32))
}
