//! From a sample's uncertainty score to its label-smoothing value ε.
//!
//! The paper elicits an integer score from 1 (exactly one correct answer, as in arithmetic) to
//! 10 (many equally good answers, as in creative writing). ual maps it linearly:
//! u = (score − 1) / 9 and ε = ε_min + (ε_max − ε_min)·u, with ε_min = 0 and ε_max = 0.2 by
//! default (see UAL-PAPER.md in the docs). The `sft` and `ls` baselines ignore the score.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// The lowest and highest score of the elicitation scale.
pub const SCORE_MIN: f64 = 1.0;
pub const SCORE_MAX: f64 = 10.0;

/// Which loss the run trains with: the paper's method and its two baselines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// Per-sample smoothing from the uncertainty score.
    #[default]
    Ual,
    /// Plain cross-entropy (ε = 0).
    Sft,
    /// One fixed ε for every sample (classic label smoothing).
    Ls,
}

/// The score → ε mapping of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmoothingConfig {
    pub loss: LossKind,
    /// ε at the lowest score.
    pub eps_min: f64,
    /// ε at the highest score.
    pub eps_max: f64,
    /// ε of the `ls` baseline.
    pub eps_fixed: f64,
    /// The score given to samples that carry none (counted in the run summary).
    pub default_score: f64,
}

impl Default for SmoothingConfig {
    fn default() -> Self {
        Self {
            loss: LossKind::Ual,
            eps_min: 0.0,
            eps_max: 0.2,
            eps_fixed: 0.1,
            default_score: 5.5,
        }
    }
}

impl SmoothingConfig {
    pub fn validate(&self) -> Result<()> {
        for (name, eps) in [
            ("eps_min", self.eps_min),
            ("eps_max", self.eps_max),
            ("eps_fixed", self.eps_fixed),
        ] {
            if !(0.0..1.0).contains(&eps) {
                bail!("smoothing.{name} = {eps} is outside [0, 1)");
            }
        }
        check_score(self.default_score).map_err(|e| anyhow::anyhow!("smoothing.default_score: {e}"))
    }

    /// ε for a sample with uncertainty `score` (already validated).
    pub fn smoothing(&self, score: f64) -> f32 {
        match self.loss {
            LossKind::Sft => 0.0,
            LossKind::Ls => self.eps_fixed as f32,
            LossKind::Ual => {
                let u = (score - SCORE_MIN) / (SCORE_MAX - SCORE_MIN);
                (self.eps_min + (self.eps_max - self.eps_min) * u) as f32
            }
        }
    }
}

/// Rejects NaN and scores outside the 1–10 scale.
pub fn check_score(score: f64) -> Result<()> {
    if !score.is_finite() || !(SCORE_MIN..=SCORE_MAX).contains(&score) {
        bail!("uncertainty {score} is outside the scale [{SCORE_MIN}, {SCORE_MAX}]");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_mapping_spans_eps_min_to_eps_max() {
        let c = SmoothingConfig::default();
        assert_eq!(c.smoothing(1.0), 0.0);
        assert!((c.smoothing(10.0) - 0.2).abs() < 1e-7);
        assert!((c.smoothing(5.5) - 0.1).abs() < 1e-7);
    }

    #[test]
    fn baselines_ignore_the_score() {
        let sft = SmoothingConfig {
            loss: LossKind::Sft,
            ..Default::default()
        };
        let ls = SmoothingConfig {
            loss: LossKind::Ls,
            ..Default::default()
        };
        assert_eq!(sft.smoothing(9.0), 0.0);
        assert!((ls.smoothing(1.0) - 0.1).abs() < 1e-7);
    }

    #[test]
    fn out_of_scale_scores_are_errors() {
        assert!(check_score(0.5).is_err());
        assert!(check_score(f64::NAN).is_err());
        assert!(check_score(11.0).is_err());
        assert!(check_score(3.0).is_ok());
    }
}
