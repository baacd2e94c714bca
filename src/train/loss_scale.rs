//! f16's dynamic loss scale, which keeps small gradients from flushing to zero (the element
//! types themselves are `model::precision`'s).

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use super::StepGradients;
use crate::model::Llama;
use crate::model::precision::Precision;

/// A step's loss scaling: f16's dynamic [`LossScale`], or none (a scale of 1 that never moves),
/// in the three moves of PyTorch's `GradScaler`: [`Scaler::scale`] before the backward pass,
/// [`Scaler::unscale`] after it, [`Scaler::update`] once the step's gradient norm is known.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Scaler(Option<LossScale>);

impl Scaler {
    /// A dynamic scale for `precision = "f16"`, none otherwise.
    pub fn new(precision: Precision) -> Self {
        Self(precision.scales_loss().then(LossScale::new))
    }

    /// The factor on the loss of the step about to run.
    pub fn scale(&self) -> f64 {
        self.0.map_or(1.0, |s| s.scale)
    }

    /// Divides the step's figures and gradients by the factor its backward pass ran under.
    pub fn unscale(&self, model: &Llama, step: &mut StepGradients) {
        let scale = self.scale();
        if scale != 1.0 {
            (step.loss, step.nll) = (step.loss / scale, step.nll / scale);
            super::optim::scale_grads(model, &mut step.grads, 1.0 / scale);
        }
    }

    /// Moves the scale after step `step`, whose unscaled gradients were `finite` or not, and
    /// says whether the step is applied (always, without a scale: a non-finite step then stops
    /// the run as divergence). A scale that fell through its floor is an error.
    pub fn update(&mut self, step: usize, finite: bool) -> Result<bool> {
        let Some(scale) = &mut self.0 else {
            return Ok(true);
        };
        let applied = scale.update(finite, LossScale::INTERVAL);
        if scale.exhausted() {
            bail!(
                "step {step}: the f16 loss scale fell below {} after overflow upon overflow, so the forward pass itself overflows f16; use precision = \"bf16\" or \"f32\"",
                LossScale::FLOOR
            );
        }
        Ok(applied)
    }

    /// The scale to checkpoint, if the run has one.
    pub fn state(&self) -> Option<LossScale> {
        self.0
    }

    /// Continues from a checkpoint's scale (the initial one for a checkpoint without).
    pub fn restore(&mut self, saved: Option<LossScale>) {
        if self.0.is_some() {
            self.0 = Some(saved.unwrap_or_default());
        }
    }
}

/// A dynamic loss scale, as PyTorch's `GradScaler` keeps one: the loss is multiplied by
/// `scale` before the backward pass and the gradients divided by it after. A step whose
/// gradients overflow is skipped and the scale halved; after `interval` clean steps in a row
/// it doubles, so it hovers just below the largest scale f16 takes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    /// The factor on the loss.
    pub scale: f64,
    /// Clean steps since the scale last changed.
    pub clean_steps: usize,
}

impl LossScale {
    /// 2¹⁶, GradScaler's initial scale.
    pub const INITIAL: f64 = 65_536.0;
    /// Clean steps before the scale doubles (GradScaler's growth interval).
    pub const INTERVAL: usize = 2000;
    /// Below this the overflow is not in the gradients but in the forward pass, and no scale
    /// helps.
    pub const FLOOR: f64 = 1.0;

    /// The scale a run starts with.
    pub fn new() -> Self {
        Self {
            scale: Self::INITIAL,
            clean_steps: 0,
        }
    }

    /// Updates the scale after a step whose unscaled gradients were `finite` or not, and says
    /// whether the step may be applied.
    pub fn update(&mut self, finite: bool, interval: usize) -> bool {
        if !finite {
            self.scale /= 2.0;
            self.clean_steps = 0;
            return false;
        }
        self.clean_steps += 1;
        if self.clean_steps >= interval {
            self.scale *= 2.0;
            self.clean_steps = 0;
        }
        true
    }

    /// Whether the scale has fallen so far that the run has diverged.
    pub fn exhausted(&self) -> bool {
        self.scale < Self::FLOOR
    }
}

impl Default for LossScale {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overflow_halves_the_scale_and_skips_the_step() {
        let mut s = LossScale::new();
        assert!(s.update(true, 3));
        assert!(!s.update(false, 3), "an overflowing step is skipped");
        assert_eq!(s.scale, LossScale::INITIAL / 2.0);
        assert_eq!(s.clean_steps, 0, "an overflow restarts the count");
    }

    #[test]
    fn the_scale_doubles_after_interval_clean_steps() {
        let mut s = LossScale::new();
        assert!(s.update(true, 3) && s.update(true, 3));
        assert_eq!(s.scale, LossScale::INITIAL);
        assert!(s.update(true, 3));
        assert_eq!(s.scale, 2.0 * LossScale::INITIAL);
        assert_eq!(s.clean_steps, 0);
    }

    #[test]
    fn seventeen_overflows_in_a_row_exhaust_the_scale() {
        let mut s = LossScale::new();
        for _ in 0..16 {
            s.update(false, 3);
            assert!(!s.exhausted());
        }
        s.update(false, 3);
        assert!(s.exhausted(), "2^16 / 2^17 < 1");
    }
}
