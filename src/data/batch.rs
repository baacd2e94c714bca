//! Tokenised samples and the batches the trainer consumes: ids, the response mask expressed as
//! the rows that carry loss, and per-token smoothing.

use anyhow::{Context, Result};
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::formats::Example;
use super::template::{Segment, Template};
use crate::loss::RowLabels;
use crate::model::Tokenizer;
use crate::uncertainty::SmoothingConfig;

/// What to do with a sample longer than `max_seq_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Overflow {
    /// Cut the end of the response.
    #[default]
    Truncate,
    /// Leave the sample out.
    Drop,
}

/// One tokenised example.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The example's text with its special tokens; EOS ends each response.
    pub ids: Vec<u32>,
    /// `loss_mask[t]`: token `t` is a response token and carries loss.
    pub loss_mask: Vec<bool>,
    /// The label-smoothing value of every response token of this sample.
    pub smoothing: f32,
    /// 1-based line of the example in its file.
    pub line: usize,
    /// The example's uncertainty score, if it carries one.
    pub uncertainty: Option<f64>,
}

impl Sample {
    /// How many tokens carry loss.
    pub fn response_tokens(&self) -> usize {
        // The first token has no position before it to predict it.
        self.loss_mask.iter().skip(1).filter(|&&m| m).count()
    }

    /// The index of the first response token.
    pub fn response_start(&self) -> usize {
        self.loss_mask
            .iter()
            .position(|&m| m)
            .unwrap_or(self.ids.len())
    }
}

/// Counts for the run summary.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DataSummary {
    pub samples: usize,
    pub truncated: usize,
    pub dropped: usize,
    pub without_uncertainty: usize,
    pub response_tokens: usize,
}

/// Tokenises examples. For `prompt`/`completion` lines, ids = encode(prompt + completion) + EOS
/// and the response tokens are those after len(encode(prompt)); templated examples follow the
/// same rule segment by segment (see [`encode_segments`]).
pub fn tokenize(
    examples: &[Example],
    tokenizer: &Tokenizer,
    template: &Template,
    eos: u32,
    smoothing: &SmoothingConfig,
    max_seq_len: usize,
    overflow: Overflow,
) -> Result<(Vec<Sample>, DataSummary)> {
    let mut summary = DataSummary::default();
    let mut samples = Vec::with_capacity(examples.len());
    for example in examples {
        let segments = template
            .segments(&example.body)
            .with_context(|| format!("line {}", example.line))?;
        let eos = (!template.writes_special_tokens(&example.body)).then_some(eos);
        let (mut ids, mut loss_mask) = encode_segments(tokenizer, &segments, eos)?;
        if example.uncertainty.is_none() {
            summary.without_uncertainty += 1;
        }
        if ids.len() > max_seq_len {
            ids.truncate(max_seq_len);
            loss_mask.truncate(max_seq_len);
            // A sample whose prompt fills the window has nothing left to learn from.
            if overflow == Overflow::Drop || !loss_mask.iter().skip(1).any(|&m| m) {
                summary.dropped += 1;
                continue;
            }
            summary.truncated += 1;
        }
        let score = example.uncertainty.unwrap_or(smoothing.default_score);
        let sample = Sample {
            ids,
            loss_mask,
            smoothing: smoothing.smoothing(score),
            line: example.line,
            uncertainty: example.uncertainty,
        };
        summary.response_tokens += sample.response_tokens();
        samples.push(sample);
    }
    summary.samples = samples.len();
    Ok((samples, summary))
}

/// Token ids of the segments' concatenated text, and which of them carry loss.
///
/// Segment `i` covers tokens `len(encode(text before i)) .. len(encode(text through i))`, the
/// rule transformers-based trainers use for a prompt and its completion. `eos`, when given, is
/// appended as a response token; otherwise the text carries its own special tokens (a chat
/// template) and the tokenizer adds none.
pub fn encode_segments(
    tokenizer: &Tokenizer,
    segments: &[Segment],
    eos: Option<u32>,
) -> Result<(Vec<u32>, Vec<bool>)> {
    let special = eos.is_some();
    let mut text = String::new();
    let mut mask = Vec::new();
    for segment in segments {
        text.push_str(&segment.text);
        let end = tokenizer.encode_with(&text, special)?.len();
        mask.resize(end.max(mask.len()), segment.trains);
    }
    let mut ids = tokenizer.encode_with(&text, special)?;
    mask.resize(ids.len(), segments.last().is_some_and(|s| s.trains));
    if let Some(eos) = eos {
        ids.push(eos);
        mask.push(true);
    }
    Ok((ids, mask))
}

/// Groups sample indices into batches of similar length, to cut padding.
pub fn length_buckets(samples: &[Sample], batch_size: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.sort_by_key(|&i| (samples[i].ids.len(), i));
    order
        .chunks(batch_size.max(1))
        .map(<[usize]>::to_vec)
        .collect()
}

/// A right-padded batch on a device, with the flat indices of the rows that carry loss.
pub struct Batch {
    /// `[batch, len]` token ids.
    pub ids: Tensor<2, Int>,
    /// Row `b * len + t` of the flattened hidden states predicts `labels.targets()[i]`.
    pub rows: Tensor<1, Int>,
    pub labels: RowLabels,
    /// Tokens in the batch, padding excluded.
    pub tokens: usize,
}

impl Batch {
    pub fn new(samples: &[&Sample], device: &Device) -> Result<Self> {
        let len = samples.iter().map(|s| s.ids.len()).max().unwrap_or(1);
        let mut ids = vec![0i64; samples.len() * len];
        let (mut rows, mut targets, mut smoothing) = (Vec::new(), Vec::new(), Vec::new());
        for (b, s) in samples.iter().enumerate() {
            for (t, &id) in s.ids.iter().enumerate() {
                ids[b * len + t] = id as i64;
            }
            // Position t - 1 predicts token t; the first token is never a target.
            for t in (1..s.ids.len()).filter(|&t| s.loss_mask[t]) {
                rows.push((b * len + t - 1) as i64);
                targets.push(s.ids[t]);
                smoothing.push(s.smoothing);
            }
        }
        let n = rows.len();
        Ok(Self {
            ids: Tensor::from_data(TensorData::new(ids, [samples.len(), len]), device),
            rows: Tensor::from_data(TensorData::new(rows, [n]), device),
            labels: RowLabels::new(targets, smoothing, vec![true; n])?,
            tokens: samples.iter().map(|s| s.ids.len()).sum(),
        })
    }
}
