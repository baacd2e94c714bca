//! Tokenised samples: ids, the tokens that carry loss, and each sample's smoothing and weight.
//! `loss::Batch` puts them on a device.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::formats::Example;
use super::template::{Segment, Template};
use super::tokenizer::Tokenizer;
use crate::uncertainty::SmoothingConfig;

/// How an optimizer step's token losses become its loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Reduction {
    /// The mean over every loss token of the step (ARCHITECTURE §3; ual's choice).
    #[default]
    Tokens,
    /// Each sample's mean, then the mean over the step's samples, so that every sample weighs
    /// the same (the authors' `loss_fn` at micro-batch 1, averaged over 64 accumulations).
    Samples,
}

/// Which tokens carry loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LossOn {
    /// The response (assistant turns) only: ual's choice.
    #[default]
    Response,
    /// Every token but padding and position 0, prompt and template included (the authors'
    /// `mask_inputs = False`).
    All,
}

/// How examples become samples, beyond what the model (tokenizer, template) decides.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRules {
    /// Samples longer than this are cut or dropped.
    pub max_seq_len: usize,
    /// What happens to a sample longer than `max_seq_len`.
    pub overflow: Overflow,
    /// Which tokens carry loss.
    pub loss_on: LossOn,
    /// How scores become ε.
    pub smoothing: SmoothingConfig,
    /// The logits width V, for smoothing spread over the V − 1 other tokens.
    pub vocab: usize,
}

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
    /// `loss_mask[t]`: token `t` is labelled (a response token, or any token with
    /// `loss_on = "all"`); it carries loss from t = 1 on.
    pub loss_mask: Vec<bool>,
    /// The sample's ε in the configuration's convention (`smoothing.spread`).
    pub epsilon: f64,
    /// The label-smoothing value the kernels apply to every loss token (mass ε/V on all V).
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

    /// How many tokens are labelled, position 0 included: the authors' per-sample divisor
    /// (`real_mask.sum()` before the shift), one more than the loss tokens with `loss_on = "all"`.
    pub fn labelled_tokens(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m).count()
    }

    /// The weight of each of this sample's loss tokens in a step's summed loss.
    pub fn row_weight(&self, reduction: Reduction) -> f32 {
        match reduction {
            Reduction::Tokens => 1.0,
            Reduction::Samples => 1.0 / self.labelled_tokens().max(1) as f32,
        }
    }

    /// What this sample adds to the step's divisor: its loss tokens, or one sample.
    pub fn share(&self, reduction: Reduction) -> f64 {
        match reduction {
            Reduction::Tokens => self.response_tokens() as f64,
            Reduction::Samples => 1.0,
        }
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
    /// Samples kept.
    pub samples: usize,
    /// Samples cut at `max_seq_len`.
    pub truncated: usize,
    /// Samples left out.
    pub dropped: usize,
    /// Samples without an `uncertainty` score.
    pub without_uncertainty: usize,
    /// Tokens that carry loss, over all samples.
    pub response_tokens: usize,
}

/// How a model's tokenizer and a template turn examples into samples, with one set of rules:
/// the one value every command that reads training-schema data prepares it with.
pub struct Prepare<'a> {
    /// The model's tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// How examples become text.
    pub template: &'a Template,
    /// The id that ends each response.
    pub eos: u32,
    /// Length, loss tokens and smoothing.
    pub rules: SampleRules,
}

impl<'a> Prepare<'a> {
    /// ual's default rules: loss on the response, ual's ε mapping spread over all V tokens,
    /// responses truncated at `max_seq_len`.
    pub fn new(
        tokenizer: &'a Tokenizer,
        template: &'a Template,
        eos: u32,
        max_seq_len: usize,
    ) -> Self {
        Self {
            tokenizer,
            template,
            eos,
            rules: SampleRules {
                max_seq_len,
                overflow: Overflow::Truncate,
                loss_on: LossOn::Response,
                smoothing: SmoothingConfig::default(),
                vocab: tokenizer.inner().get_vocab_size(true),
            },
        }
    }

    /// The same preparation under `rules`.
    pub fn with_rules(self, rules: SampleRules) -> Self {
        Self { rules, ..self }
    }

    /// The samples of `examples` ([`prepare`]).
    pub fn examples(&self, examples: &[Example]) -> Result<(Vec<Sample>, DataSummary)> {
        prepare(
            examples,
            self.tokenizer,
            self.template,
            self.eos,
            &self.rules,
        )
    }

    /// The examples of the JSONL file at `path` and their samples; errors name the file.
    pub fn file(&self, path: &Path) -> Result<(Vec<Example>, Vec<Sample>, DataSummary)> {
        let examples = super::formats::read_jsonl(path)?;
        let (samples, summary) = self
            .examples(&examples)
            .with_context(|| path.display().to_string())?;
        Ok((examples, samples, summary))
    }
}

/// Tokenises examples, then maps the kept samples' scores to ε over the whole set (the
/// authors' mapping is a dataset-level pass).
///
/// For `prompt`/`completion` lines, ids = encode(prompt + completion) + EOS and the response
/// tokens are those after len(encode(prompt)); templated examples follow the same rule segment
/// by segment (see [`encode_segments`]), and templates that tokenise each turn on its own
/// (`vicuna`) do so turn by turn.
pub fn prepare(
    examples: &[Example],
    tokenizer: &Tokenizer,
    template: &Template,
    eos: u32,
    rules: &SampleRules,
) -> Result<(Vec<Sample>, DataSummary)> {
    let mut summary = DataSummary::default();
    let mut samples = Vec::with_capacity(examples.len());
    for (example, encoded) in examples
        .iter()
        .zip(encode_all(examples, tokenizer, template, eos, rules))
    {
        let (mut ids, mut loss_mask) = encoded.with_context(|| format!("line {}", example.line))?;
        if rules.loss_on == LossOn::All {
            loss_mask.fill(true);
        }
        if example.uncertainty.is_none() {
            summary.without_uncertainty += 1;
        }
        if ids.len() > rules.max_seq_len {
            ids.truncate(rules.max_seq_len);
            loss_mask.truncate(rules.max_seq_len);
            // A sample whose prompt fills the window has nothing left to learn from.
            if rules.overflow == Overflow::Drop || !loss_mask.iter().skip(1).any(|&m| m) {
                summary.dropped += 1;
                continue;
            }
            summary.truncated += 1;
        }
        let sample = Sample {
            ids,
            loss_mask,
            epsilon: 0.0,
            smoothing: 0.0,
            line: example.line,
            uncertainty: example.uncertainty,
        };
        summary.response_tokens += sample.response_tokens();
        samples.push(sample);
    }
    let scores: Vec<Option<f64>> = samples.iter().map(|s| s.uncertainty).collect();
    let lines: Vec<usize> = samples.iter().map(|s| s.line).collect();
    let epsilons = rules.smoothing.epsilons(&scores, &lines)?;
    for (sample, eps) in samples.iter_mut().zip(epsilons) {
        sample.epsilon = eps;
        sample.smoothing = rules.smoothing.kernel_epsilon(eps, rules.vocab);
    }
    summary.samples = samples.len();
    Ok((samples, summary))
}

/// Every example's ids and labelled positions, in order, on every core; a bar on stderr once
/// it has taken a second (a 200 MB file once tokenised for 7 minutes on one thread, silently).
fn encode_all(
    examples: &[Example],
    tokenizer: &Tokenizer,
    template: &Template,
    eos: u32,
    rules: &SampleRules,
) -> Vec<Result<(Vec<u32>, Vec<bool>)>> {
    use rayon::prelude::*;
    use std::sync::Once;
    let started = std::time::Instant::now();
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(examples.len() as u64),
        indicatif::ProgressDrawTarget::hidden(),
    )
    .with_message("tokenising");
    let shown = Once::new();
    let encoded = examples
        .par_iter()
        .map(|example| {
            let out = encode_example(tokenizer, template, example, eos, rules.max_seq_len);
            bar.inc(1);
            if started.elapsed().as_secs_f64() > 1.0 {
                shown.call_once(|| {
                    bar.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{msg} {wide_bar} {pos}/{len} lines, {eta} left",
                        )
                        .expect("a valid template"),
                    );
                    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                });
            }
            out
        })
        .collect();
    bar.finish_and_clear();
    encoded
}

/// One example's ids and labelled positions under `template`.
fn encode_example(
    tokenizer: &Tokenizer,
    template: &Template,
    example: &Example,
    eos: u32,
    max_seq_len: usize,
) -> Result<(Vec<u32>, Vec<bool>)> {
    let mut budget = max_seq_len.saturating_mul(BYTES_PER_TOKEN_AT_MOST);
    if let Some(turns) = template.turns(&example.body) {
        // Each turn as the tokenizer encodes it alone (its BOS first), then EOS.
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        for mut turn in turns {
            if budget == 0 {
                break;
            }
            cut_text(&mut turn, &mut budget);
            let (turn_ids, turn_mask) = encode_segments(tokenizer, &turn, Some(eos))?;
            ids.extend(turn_ids);
            mask.extend(turn_mask);
        }
        return Ok((ids, mask));
    }
    let mut segments = template.segments(&example.body)?;
    cut_text(&mut segments, &mut budget);
    let eos = (!template.writes_special_tokens(&example.body)).then_some(eos);
    encode_segments(tokenizer, &segments, eos)
}

/// More bytes than any one token of a supported tokenizer covers (Llama's longest is 16), so
/// text cut after `max_seq_len` times this many bytes still yields every token that is kept.
const BYTES_PER_TOKEN_AT_MOST: usize = 128;

/// Cuts `segments` after `budget` bytes of text (at a character boundary), spending the budget,
/// so that a huge line costs what its kept tokens cost rather than its whole length.
fn cut_text(segments: &mut Vec<Segment>, budget: &mut usize) {
    let mut kept = 0;
    for segment in segments.iter_mut() {
        if *budget == 0 {
            break;
        }
        if segment.text.len() > *budget {
            let mut end = *budget;
            while !segment.text.is_char_boundary(end) {
                end -= 1;
            }
            segment.text.truncate(end);
        }
        *budget -= segment.text.len();
        kept += 1;
    }
    segments.truncate(kept);
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
