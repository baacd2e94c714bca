//! `ual eval loss`: how well a model predicts held-out responses, overall and by uncertainty.

use anyhow::Result;
use serde::Serialize;

use super::score::score_sample;
use crate::data::batch::Sample;
use crate::model::Llama;

/// Token-weighted means over a set of samples.
#[derive(Debug, Clone, Serialize)]
pub struct LossFigures {
    /// Samples scored.
    pub samples: usize,
    /// Tokens that carry loss.
    pub response_tokens: usize,
    /// Mean response-token negative log-likelihood (nats).
    pub nll: f64,
    /// `exp(nll)`.
    pub perplexity: f64,
    /// The UAL loss, each token smoothed by its sample's ε.
    pub ual_loss: f64,
}

/// `ual eval loss`'s report.
#[derive(Debug, Clone, Serialize)]
pub struct LossReport {
    /// The file scored.
    pub data: String,
    /// Over every sample.
    pub overall: LossFigures,
    /// `low` (score < 4), `mid` (4 to 7), `high` (> 7) and `none` (no score); empty ones omitted.
    pub by_uncertainty: Vec<(String, LossFigures)>,
}

fn bucket(score: Option<f64>) -> &'static str {
    match score {
        None => "none",
        Some(s) if s < 4.0 => "low",
        Some(s) if s <= 7.0 => "mid",
        Some(_) => "high",
    }
}

#[derive(Default)]
struct Sums {
    samples: usize,
    tokens: usize,
    nll: f64,
    loss: f64,
}

impl Sums {
    fn add(&mut self, tokens: usize, nll: f64, loss: f64) {
        self.samples += 1;
        self.tokens += tokens;
        self.nll += nll * tokens as f64;
        self.loss += loss * tokens as f64;
    }

    fn figures(&self) -> LossFigures {
        let n = self.tokens.max(1) as f64;
        LossFigures {
            samples: self.samples,
            response_tokens: self.tokens,
            nll: self.nll / n,
            perplexity: (self.nll / n).exp(),
            ual_loss: self.loss / n,
        }
    }
}

/// Scores every sample and aggregates, calling `progress` after each.
pub fn evaluate_loss(
    model: &Llama,
    samples: &[Sample],
    data: &str,
    mut progress: impl FnMut(),
) -> Result<LossReport> {
    if samples.is_empty() {
        anyhow::bail!("{data}: no samples to evaluate");
    }
    let mut overall = Sums::default();
    let mut buckets: Vec<(&str, Sums)> = ["low", "mid", "high", "none"]
        .map(|b| (b, Sums::default()))
        .into();
    // Under `mpirun` each rank scores a slice; every rank sums all of them, in order.
    let scores =
        crate::cluster::world().share_work(samples, "scoring the samples", |i, sample| {
            let s = score_sample(model, sample, i)?;
            progress();
            Ok((s.response_tokens, s.nll, s.loss))
        })?;
    for (sample, (tokens, nll, loss)) in samples.iter().zip(scores) {
        overall.add(tokens, nll, loss);
        let slot = buckets
            .iter_mut()
            .find(|(b, _)| *b == bucket(sample.uncertainty))
            .expect("known bucket");
        slot.1.add(tokens, nll, loss);
    }
    Ok(LossReport {
        data: data.to_string(),
        overall: overall.figures(),
        by_uncertainty: buckets
            .into_iter()
            .filter(|(_, s)| s.samples > 0)
            .map(|(b, s)| (b.to_string(), s.figures()))
            .collect(),
    })
}
