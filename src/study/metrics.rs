//! The study's two measures that no other command computes: the diversity of sampled answers
//! and the calibration of next-token confidence.

use anyhow::{Result, anyhow};
use burn::tensor::activation::softmax;

use crate::data::batch::Sample;
use crate::loss::Batch;
use crate::model::Llama;

/// Corpus-level distinct-n (Li et al., 2016): distinct n-grams over all n-grams, across every
/// text, with words split on whitespace and lower-cased. Texts shorter than `n` words add no
/// n-gram; no n-gram at all gives 0.
pub fn distinct_n(texts: &[String], n: usize) -> f64 {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0usize;
    for text in texts {
        let words: Vec<String> = text.split_whitespace().map(str::to_lowercase).collect();
        for gram in words.windows(n) {
            seen.insert(gram.to_vec());
            total += 1;
        }
    }
    match total {
        0 => 0.0,
        _ => seen.len() as f64 / total as f64,
    }
}

/// One predicted token: the probability of the model's most likely token, and whether that
/// token is the one that follows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// max over the vocabulary of p(token | prefix).
    pub confidence: f64,
    /// Whether the argmax is the target.
    pub correct: bool,
}

/// Expected calibration error over `bins` equal-width confidence bins:
/// Σ_b (n_b / N) · |accuracy_b − mean confidence_b|. The last bin includes 1.0. No predictions
/// give 0.
pub fn expected_calibration_error(predictions: &[Prediction], bins: usize) -> f64 {
    let mut sums = vec![(0usize, 0.0f64, 0usize); bins];
    for p in predictions {
        let b = ((p.confidence * bins as f64) as usize).min(bins - 1);
        sums[b].0 += 1;
        sums[b].1 += p.confidence;
        sums[b].2 += usize::from(p.correct);
    }
    let n = predictions.len().max(1) as f64;
    sums.iter()
        .filter(|(count, _, _)| *count > 0)
        .map(|&(count, conf, right)| {
            let c = count as f64;
            (c / n) * (right as f64 / c - conf / c).abs()
        })
        .sum()
}

/// The model's top-1 prediction at every loss-carrying position of `sample`.
pub fn predictions(model: &Llama, sample: &Sample) -> Result<Vec<Prediction>> {
    let batch = Batch::new(&[sample], &model.device())?;
    let hidden = model.hidden_states(batch.ids.clone());
    let [b, s, h] = hidden.dims();
    let rows = hidden.reshape([b * s, h]).select(0, batch.rows.clone());
    let count = rows.dims()[0];
    let probs = softmax(model.logits(rows.reshape([1, count, h])), 2);
    let read = |t: burn::tensor::TensorData| t.convert::<f32>().try_to_vec::<f32>();
    let confidence = read(probs.clone().max_dim(2).into_data()).map_err(|e| anyhow!("{e:?}"))?;
    let argmax = probs
        .argmax(2)
        .into_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .map_err(|e| anyhow!("{e:?}"))?;
    Ok(confidence
        .iter()
        .zip(&argmax)
        .zip(batch.labels.targets())
        .map(|((&c, &top), &target)| Prediction {
            confidence: c as f64,
            correct: top == target as i64,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_n_counts_unique_grams_over_all_texts() {
        // "the cat sat" + "the cat ran": unigrams the, cat, sat, the, cat, ran → 4 of 6;
        // bigrams (the cat), (cat sat), (the cat), (cat ran) → 3 of 4.
        let texts = ["The cat sat".to_string(), "the cat  ran".to_string()];
        assert!((distinct_n(&texts, 1) - 4.0 / 6.0).abs() < 1e-12);
        assert!((distinct_n(&texts, 2) - 3.0 / 4.0).abs() < 1e-12);
        assert_eq!(distinct_n(&["one".to_string()], 2), 0.0);
        assert_eq!(distinct_n(&[], 1), 0.0);
    }

    #[test]
    fn ece_of_a_hand_worked_example() {
        // Bins of width 0.5 (two bins). Bin [0, 0.5): confidences 0.2, 0.4, one right:
        // accuracy 0.5, confidence 0.3, gap 0.2. Bin [0.5, 1]: 0.9, 0.9, 1.0, 0.6, three
        // right: accuracy 0.75, confidence 0.85, gap 0.1. ECE = 2/6 · 0.2 + 4/6 · 0.1 = 0.1333.
        let p = |confidence, correct| Prediction {
            confidence,
            correct,
        };
        let predictions = [
            p(0.2, true),
            p(0.4, false),
            p(0.9, true),
            p(0.9, false),
            p(1.0, true),
            p(0.6, true),
        ];
        let ece = expected_calibration_error(&predictions, 2);
        assert!(
            (ece - (2.0 / 6.0 * 0.2 + 4.0 / 6.0 * 0.1)).abs() < 1e-12,
            "{ece}"
        );
        // A perfectly calibrated set: confidence 1 and always right.
        assert_eq!(expected_calibration_error(&[p(1.0, true); 3], 10), 0.0);
        assert_eq!(expected_calibration_error(&[], 10), 0.0);
    }
}
