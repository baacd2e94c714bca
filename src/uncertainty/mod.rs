//! From samples' uncertainty scores to their label-smoothing values ε.
//!
//! Two mappings exist. `linear` is ual's own choice: a score s on the scale [min, max] (1–10
//! by default) gives ε = ε_min + (ε_max − ε_min)·(s − min)/(max − min), 0 to 0.2 by default, one
//! sample at a time. `mean_normalised` is the authors' (`make_score_dist` in their
//! `finetune/utils.py`, see `UAL-PAPER.md`): ε is proportional to the score, with the dataset's
//! mean fixed at ε̄ and a cap, found by a fixed-point loop over the whole training set. It is a
//! dataset-level pass, so [`SmoothingConfig::epsilons`] maps every sample at once.
//!
//! The `sft` and `ls` baselines ignore the score.
//!
//! ε is stated in the configuration's own convention (`spread`): spread over all V tokens, as
//! PyTorch's `label_smoothing` does, or over the V − 1 other tokens, as the authors' code does.
//! The kernels use the first; [`SmoothingConfig::kernel_epsilon`] converts exactly.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// ual's elicitation scale: its 1–10 "how open-ended" prompt.
pub const UAL_SCALE: [f64; 2] = [1.0, 10.0];
/// The authors' elicitation scale: their 0–99 "need for diversity" prompt.
pub const PAPER_SCALE: [f64; 2] = [0.0, 99.0];

/// Which loss the run trains with: UAL and its two baselines.
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

/// How scores become ε.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mapping {
    /// ual's: affine in the score, per sample, from `eps_min` to `eps_max`.
    #[default]
    Linear,
    /// The authors': proportional to the score, dataset mean `target_mean`, capped at `cap`.
    MeanNormalised,
}

/// Over which tokens the smoothing mass ε is spread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Spread {
    /// ε/V on every token, the target included (PyTorch's and transformers' convention).
    #[default]
    All,
    /// ε/(V − 1) on every token but the target, which keeps 1 − ε (the authors' `label_smooth`).
    Others,
}

/// The score → ε mapping of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmoothingConfig {
    /// UAL (per-sample ε), SFT (ε = 0) or fixed label smoothing.
    pub loss: LossKind,
    /// How a score becomes ε.
    pub mapping: Mapping,
    /// The elicitation scale `[min, max]`; a score outside it is an error naming its line.
    pub scale: [f64; 2],
    /// `linear`: ε at the lowest score.
    pub eps_min: f64,
    /// `linear`: ε at the highest score.
    pub eps_max: f64,
    /// `mean_normalised`: the dataset's mean ε (the authors' `smooth_value`, ε̄).
    pub target_mean: f64,
    /// `mean_normalised`: no sample's ε exceeds this.
    pub cap: f64,
    /// ε of the `ls` baseline.
    pub eps_fixed: f64,
    /// `linear`: the score of samples that carry none (counted in the run summary).
    /// `mean_normalised` needs every sample scored.
    pub default_score: f64,
    /// Whether ε covers all V tokens or the V − 1 others.
    pub spread: Spread,
    /// `linear`: a sample without a score is an error naming its line, instead of a warning
    /// and `default_score`.
    pub require_uncertainty: bool,
}

impl Default for SmoothingConfig {
    fn default() -> Self {
        Self {
            loss: LossKind::Ual,
            mapping: Mapping::Linear,
            scale: UAL_SCALE,
            eps_min: 0.0,
            eps_max: 0.2,
            target_mean: 0.1,
            cap: 0.99,
            eps_fixed: 0.1,
            default_score: 5.5,
            spread: Spread::All,
            require_uncertainty: false,
        }
    }
}

/// The authors' loop stops once the mean is this close to ε̄ (`make_score_dist`).
const MEAN_TOLERANCE: f64 = 1e-3;
/// Their loop has no bound; a target the cap makes unreachable would spin forever.
const MAX_ROUNDS: usize = 10_000;

impl SmoothingConfig {
    /// Refuses settings that give no ε in [0, 1).
    pub fn validate(&self) -> Result<()> {
        for (name, eps) in [
            ("eps_min", self.eps_min),
            ("eps_max", self.eps_max),
            ("eps_fixed", self.eps_fixed),
            ("target_mean", self.target_mean),
            ("cap", self.cap),
        ] {
            if !(0.0..1.0).contains(&eps) {
                bail!("smoothing.{name} = {eps} is outside [0, 1)");
            }
        }
        if self.target_mean > self.cap {
            bail!(
                "smoothing.target_mean = {} is above smoothing.cap = {}",
                self.target_mean,
                self.cap
            );
        }
        let [min, max] = self.scale;
        if !(min.is_finite() && max.is_finite() && min < max) {
            bail!("smoothing.scale = [{min}, {max}]: expected [min, max] with min < max");
        }
        if self.mapping == Mapping::MeanNormalised && min < 0.0 {
            bail!(
                "smoothing.scale = [{min}, {max}]: mean_normalised makes ε proportional to the score, so scores must be ≥ 0"
            );
        }
        self.check_score(self.default_score)
            .map_err(|e| anyhow::anyhow!("smoothing.default_score: {e}"))
    }

    /// Rejects NaN and scores outside the configured scale.
    pub fn check_score(&self, score: f64) -> Result<()> {
        check_score_in(score, self.scale)
    }

    /// ε of every sample, in this configuration's convention (`spread`). `scores[i]` is sample
    /// i's score and `lines[i]` its line, named in errors.
    pub fn epsilons(&self, scores: &[Option<f64>], lines: &[usize]) -> Result<Vec<f64>> {
        for (score, line) in scores.iter().zip(lines) {
            if let Some(s) = score {
                self.check_score(*s)
                    .map_err(|e| anyhow::anyhow!("line {line}: field `uncertainty`: {e}"))?;
            }
        }
        match (self.loss, self.mapping) {
            (LossKind::Sft, _) => Ok(vec![0.0; scores.len()]),
            (LossKind::Ls, _) => Ok(vec![self.eps_fixed; scores.len()]),
            (LossKind::Ual, Mapping::Linear) => {
                self.say_missing(scores, lines)?;
                Ok(scores
                    .iter()
                    .map(|s| self.linear(s.unwrap_or(self.default_score)))
                    .collect())
            }
            (LossKind::Ual, Mapping::MeanNormalised) => {
                let scores = scores
                    .iter()
                    .zip(lines)
                    .map(|(s, line)| {
                        s.ok_or_else(|| {
                            anyhow::anyhow!(
                                "line {line}: missing field `uncertainty` (smoothing.mapping = \"mean_normalised\" needs every sample scored)"
                            )
                        })
                    })
                    .collect::<Result<Vec<f64>>>()?;
                mean_normalised(&scores, self.target_mean, self.cap)
            }
        }
    }

    /// Samples without a score: an error under `require_uncertainty`, else one warning
    /// naming their lines and the ε they get.
    fn say_missing(&self, scores: &[Option<f64>], lines: &[usize]) -> Result<()> {
        let missing: Vec<usize> = scores
            .iter()
            .zip(lines)
            .filter(|(s, _)| s.is_none())
            .map(|(_, &line)| line)
            .collect();
        let Some(&first) = missing.first() else {
            return Ok(());
        };
        if self.require_uncertainty {
            bail!(
                "line {first}: missing field `uncertainty` (smoothing.require_uncertainty = true; {} line(s) lack one)",
                missing.len()
            );
        }
        let shown: Vec<String> = missing.iter().take(8).map(|l| l.to_string()).collect();
        let more = if missing.len() > 8 { ", …" } else { "" };
        eprintln!(
            "warning: {} line(s) carry no `uncertainty` (line {}{more}); each gets ε = {:.4} from smoothing.default_score = {} (smoothing.require_uncertainty = true makes this an error)",
            missing.len(),
            shown.join(", "),
            self.linear(self.default_score),
            self.default_score
        );
        Ok(())
    }

    /// ual's linear mapping of one (validated) score.
    fn linear(&self, score: f64) -> f64 {
        let [min, max] = self.scale;
        let u = (score - min) / (max - min);
        self.eps_min + (self.eps_max - self.eps_min) * u
    }

    /// `eps` (this configuration's convention) as the kernels read it: mass ε/V on every one of
    /// the `vocab` tokens. Spreading ε over the V − 1 others is the same target with
    /// ε' = ε·V/(V − 1): q(target) = 1 − ε' + ε'/V = 1 − ε and q(other) = ε'/V = ε/(V − 1).
    pub fn kernel_epsilon(&self, eps: f64, vocab: usize) -> f32 {
        match self.spread {
            Spread::All => eps as f32,
            Spread::Others => (eps * vocab as f64 / (vocab as f64 - 1.0)) as f32,
        }
    }
}

/// The authors' `make_score_dist(scores, target_mean, max_values=cap)`: repeat while
/// |mean(s) − ε̄| ≥ 0.001 { s = s / mean(s) · ε̄; s = clip(s, min(s), cap) }, in float64.
///
/// Their loop never ends when the cap makes ε̄ unreachable (too few non-zero scores); here
/// that, and an all-zero score list, is an error.
pub fn mean_normalised(scores: &[f64], target_mean: f64, cap: f64) -> Result<Vec<f64>> {
    if scores.is_empty() {
        return Ok(Vec::new());
    }
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let mut s = scores.to_vec();
    for _ in 0..MAX_ROUNDS {
        let m = mean(&s);
        if (m - target_mean).abs() < MEAN_TOLERANCE {
            return Ok(s);
        }
        if m <= 0.0 {
            bail!(
                "smoothing.mapping = \"mean_normalised\": every score is 0, so no ε can have mean {target_mean}"
            );
        }
        for v in &mut s {
            *v = *v / m * target_mean;
        }
        let low = s.iter().copied().fold(f64::INFINITY, f64::min);
        for v in &mut s {
            *v = v.clamp(low.min(cap), cap);
        }
    }
    let reachable = s.iter().filter(|&&v| v > 0.0).count() as f64 * cap / s.len() as f64;
    bail!(
        "smoothing.mapping = \"mean_normalised\": the mean ε cannot reach smoothing.target_mean = {target_mean} under smoothing.cap = {cap} (at most {reachable:.4} with these scores)"
    )
}

/// Rejects NaN and scores outside `[min, max]`.
pub fn check_score_in(score: f64, [min, max]: [f64; 2]) -> Result<()> {
    if !score.is_finite() || !(min..=max).contains(&score) {
        bail!("uncertainty {score} is outside the scale [{min}, {max}]");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(n: usize) -> Vec<usize> {
        (1..=n).collect()
    }

    #[test]
    fn linear_mapping_spans_eps_min_to_eps_max() {
        let c = SmoothingConfig::default();
        let eps = c
            .epsilons(&[Some(1.0), Some(10.0), None], &lines(3))
            .unwrap();
        assert_eq!(eps[0], 0.0);
        assert!((eps[1] - 0.2).abs() < 1e-12);
        assert!((eps[2] - 0.1).abs() < 1e-12, "default score 5.5");
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
        assert_eq!(sft.epsilons(&[Some(9.0)], &[1]).unwrap(), vec![0.0]);
        assert_eq!(ls.epsilons(&[Some(1.0)], &[1]).unwrap(), vec![0.1]);
    }

    #[test]
    fn out_of_scale_scores_name_their_line() {
        let c = SmoothingConfig::default();
        let err = format!(
            "{:#}",
            c.epsilons(&[Some(3.0), Some(11.0)], &[4, 7]).unwrap_err()
        );
        assert!(err.contains("line 7") && err.contains("[1, 10]"), "{err}");
        assert!(check_score_in(f64::NAN, UAL_SCALE).is_err());
        assert!(check_score_in(0.0, PAPER_SCALE).is_ok());
        assert!(check_score_in(100.0, PAPER_SCALE).is_err());
    }

    #[test]
    fn mean_normalised_fixes_the_mean_and_needs_every_score() {
        let c = SmoothingConfig {
            mapping: Mapping::MeanNormalised,
            scale: PAPER_SCALE,
            ..Default::default()
        };
        let eps = c
            .epsilons(&[Some(0.0), Some(20.0), Some(60.0)], &lines(3))
            .unwrap();
        let mean = eps.iter().sum::<f64>() / 3.0;
        assert!((mean - 0.1).abs() < 1e-3);
        assert_eq!(eps[0], 0.0, "a score of 0 gives ε = 0");
        assert!(
            (eps[2] / eps[1] - 3.0).abs() < 1e-9,
            "proportional to the score"
        );
        let err = format!("{:#}", c.epsilons(&[Some(5.0), None], &[2, 9]).unwrap_err());
        assert!(
            err.contains("line 9") && err.contains("uncertainty"),
            "{err}"
        );
    }

    #[test]
    fn unreachable_means_are_errors_not_endless_loops() {
        let err = mean_normalised(&[0.0, 0.0, 0.0, 1.0], 0.5, 0.99).unwrap_err();
        assert!(format!("{err}").contains("cannot reach"), "{err}");
        assert!(mean_normalised(&[0.0, 0.0], 0.1, 0.99).is_err());
    }

    #[test]
    fn others_spread_rescales_epsilon_exactly() {
        let c = SmoothingConfig {
            spread: Spread::Others,
            ..Default::default()
        };
        let v = 4;
        let e = c.kernel_epsilon(0.3, v) as f64;
        // q(target) = 1 − e + e/V must be 1 − 0.3; q(other) = e/V must be 0.3/(V − 1).
        assert!((1.0 - e + e / v as f64 - 0.7).abs() < 1e-7);
        assert!((e / v as f64 - 0.1).abs() < 1e-7);
    }

    #[test]
    fn a_missing_score_gets_the_default_or_is_refused_when_required() {
        let c = SmoothingConfig::default();
        let eps = c.epsilons(&[Some(10.0), None], &[1, 2]).unwrap();
        assert_eq!(eps[1], c.linear(c.default_score));
        let strict = SmoothingConfig {
            require_uncertainty: true,
            ..Default::default()
        };
        let err = strict.epsilons(&[Some(10.0), None], &[1, 7]).unwrap_err();
        assert!(
            format!("{err}").starts_with("line 7: missing field `uncertainty`"),
            "{err}"
        );
    }
}
