//! Every measure of one trained run: exact match, held-out NLL and calibration on the
//! low-entropy split; held-out NLL on unseen references and the diversity of sampled answers on
//! the high-entropy split; the authors' clustering analysis.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use super::config::EvalConfig;
use super::metrics::{self, distinct_n, expected_calibration_error};
use crate::data::batch::{Prepare, Sample};
use crate::data::formats::{Body, Example, parse_line, read_jsonl, response_text, text_lines};
use crate::data::template::Template;
use crate::eval::answers::{self, Answer, Provenance};
use crate::eval::clustering::{self, Prompts};
use crate::eval::gsm8k::extract_answer;
use crate::eval::heldout::evaluate_loss;
use crate::model::Pretrained;
use crate::model::generate::GenerationConfig;
use crate::train::{Mode, TrainConfig};

/// What one run scored on each measure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunMetrics {
    /// Exact-match accuracy of greedy answers on the low-entropy split.
    pub low_accuracy: f64,
    /// Mean response NLL (nats per token) on the low-entropy split.
    pub low_nll: f64,
    /// Expected calibration error of next-token confidence on the low-entropy split.
    pub low_ece: f64,
    /// Mean NLL of the high-entropy split's unseen references.
    pub high_nll: f64,
    /// Distinct unigrams over all unigrams of the sampled high-entropy answers.
    pub distinct_1: f64,
    /// Distinct bigrams over all bigrams of the same answers.
    pub distinct_2: f64,
    /// The authors' mean all-pairs silhouette over both splits' prompts, when asked for.
    pub silhouette: Option<f64>,
}

/// The two evaluation splits, read once for every run.
pub struct Splits {
    /// Low-entropy examples with their one correct answer.
    pub low: Vec<Example>,
    /// High-entropy examples (their `output` is the first reference).
    pub high: Vec<Example>,
    /// Each high-entropy example's acceptable answers.
    pub references: Vec<Vec<String>>,
}

impl Splits {
    /// Reads both splits; errors name the file, line and field.
    pub fn read(eval: &EvalConfig) -> Result<Self> {
        let low = read_jsonl(&eval.low_entropy)?;
        let mut high = Vec::new();
        let mut references = Vec::new();
        for (n, line) in text_lines(&eval.high_entropy)? {
            let at = || format!("{}:{n}", eval.high_entropy.display());
            high.push(parse_line(&line, n).with_context(at)?);
            let value: serde_json::Value = serde_json::from_str(&line).with_context(at)?;
            let refs: Vec<String> = value
                .get("references")
                .and_then(|r| serde_json::from_value(r.clone()).ok())
                .filter(|r: &Vec<String>| !r.is_empty())
                .ok_or_else(|| {
                    anyhow!(
                        "{}: field `references` must be a non-empty array of strings",
                        at()
                    )
                })?;
            references.push(refs);
        }
        for (name, split) in [(&eval.low_entropy, &low), (&eval.high_entropy, &high)] {
            if split.is_empty() {
                bail!("{}: no examples", name.display());
            }
        }
        Ok(Self {
            low,
            high,
            references,
        })
    }

    /// Units of work one run's evaluation reports to its progress callback.
    pub fn work(&self, eval: &EvalConfig) -> usize {
        let refs: usize = self.references.iter().map(Vec::len).sum();
        3 * self.low.len() + refs + 2 * self.high.len() + usize::from(eval.clustering)
    }

    /// Each high-entropy prompt once per reference.
    fn reference_examples(&self) -> Vec<Example> {
        self.high
            .iter()
            .zip(&self.references)
            .flat_map(|(example, refs)| {
                refs.iter().map(move |r| Example {
                    body: with_response(&example.body, r),
                    ..example.clone()
                })
            })
            .collect()
    }
}

/// `body` answered by `response`.
fn with_response(body: &Body, response: &str) -> Body {
    match body.clone() {
        Body::Alpaca {
            instruction, input, ..
        } => Body::Alpaca {
            instruction,
            input,
            output: response.to_string(),
        },
        Body::Completion { prompt, .. } => Body::Completion {
            prompt,
            completion: response.to_string(),
        },
        Body::Chat { mut messages } => {
            if let Some(last) = messages.iter_mut().rev().find(|m| m.role == "assistant") {
                last.content = response.to_string();
            }
            Body::Chat { messages }
        }
    }
}

/// What evaluating one run needs besides the model.
pub struct RunEval<'a> {
    /// The study's measures.
    pub eval: &'a EvalConfig,
    /// The splits.
    pub splits: &'a Splits,
    /// The run's training configuration (its template and sample rules).
    pub train: &'a TrainConfig,
    /// Where the run's answers are written (`low-answers.jsonl`, `high-answers.jsonl`,
    /// `high-samples.jsonl`).
    pub out_dir: &'a Path,
}

/// Measures `pretrained` (the run's model with its adapter), calling `tick` per unit of work.
pub fn evaluate_run(
    pretrained: &Pretrained,
    run: &RunEval,
    tick: &mut dyn FnMut(),
) -> Result<RunMetrics> {
    let template = Template::load(run.train.template, &run.train.model)?;
    let greedy = GenerationConfig {
        max_new_tokens: run.eval.max_new_tokens,
        ..Default::default()
    };
    let (model, adapter) = match run.train.mode {
        Mode::Lora => (run.train.model.clone(), Some(run.out_dir.join("adapter"))),
        Mode::Full => (run.out_dir.join("model"), None),
    };
    let provenance = |decoding: &GenerationConfig| Provenance {
        model: model.display().to_string(),
        adapter: adapter.as_ref().map(|a| a.display().to_string()),
        template: run.train.template,
        decoding: decoding.clone(),
    };
    let (low_accuracy, low_answers) = exact_match(pretrained, &template, run, &greedy, tick)?;
    write_answers(
        &run.out_dir.join("low-answers.jsonl"),
        &low_answers,
        &provenance(&greedy),
    )?;

    let eos = pretrained.config.eos_token_id()?;
    let rules = run.train.sample_rules(pretrained.config.vocab_size);
    let prepare = Prepare::new(&pretrained.tokenizer, &template, eos, run.train.max_seq_len)
        .with_rules(rules);
    let (low_samples, _) = prepare.examples(&run.splits.low)?;
    let low_nll = evaluate_loss(&pretrained.model, &low_samples, "low", &mut *tick)?
        .overall
        .nll;
    let low_ece = calibration(pretrained, &low_samples, run.eval.ece_bins, tick)?;
    let (high_samples, _) = prepare.examples(&run.splits.reference_examples())?;
    let high_nll = evaluate_loss(&pretrained.model, &high_samples, "high", &mut *tick)?
        .overall
        .nll;

    let high_answers = answers::answer_all(
        pretrained,
        &template,
        &run.splits.high,
        &greedy,
        Default::default(),
        answers::BATCH,
        |_| {
            tick();
            Ok(())
        },
    )?;
    write_answers(
        &run.out_dir.join("high-answers.jsonl"),
        &high_answers,
        &provenance(&greedy),
    )?;
    let sampled = sample_answers(pretrained, &template, run, tick)?;
    let texts: Vec<String> = sampled.iter().map(|(_, a)| a.generation.clone()).collect();
    let silhouette = match run.eval.clustering {
        true => Some(silhouette(pretrained, &template, run.splits)?).inspect(|_| tick()),
        false => None,
    };
    let lines: String = sampled
        .iter()
        .map(|(config, a)| answers::answer_line(a, &provenance(config)) + "\n")
        .collect();
    crate::util::write_atomic(&run.out_dir.join("high-samples.jsonl"), lines.as_bytes())?;
    Ok(RunMetrics {
        low_accuracy,
        low_nll,
        low_ece,
        high_nll,
        distinct_1: distinct_n(&texts, 1),
        distinct_2: distinct_n(&texts, 2),
        silhouette,
    })
}

/// Greedy answers to the low-entropy split, graded by exact match of the final number.
fn exact_match(
    pretrained: &Pretrained,
    template: &Template,
    run: &RunEval,
    greedy: &GenerationConfig,
    tick: &mut dyn FnMut(),
) -> Result<(f64, Vec<Answer>)> {
    let answers = answers::answer_all(
        pretrained,
        template,
        &run.splits.low,
        greedy,
        Default::default(),
        answers::BATCH,
        |_| {
            tick();
            Ok(())
        },
    )?;
    let mut correct = 0usize;
    for (answer, example) in answers.iter().zip(&run.splits.low) {
        let gold = response_text(&example.body)
            .and_then(extract_answer)
            .with_context(|| {
                format!(
                    "{}:{}: the reference answer holds no number to match",
                    run.eval.low_entropy.display(),
                    example.line
                )
            })?;
        correct += usize::from(extract_answer(&answer.generation).as_deref() == Some(&gold));
    }
    Ok((correct as f64 / answers.len() as f64, answers))
}

/// The expected calibration error of the model's top-1 predictions on `samples`' responses.
fn calibration(
    pretrained: &Pretrained,
    samples: &[Sample],
    bins: usize,
    tick: &mut dyn FnMut(),
) -> Result<f64> {
    let mut predictions = Vec::new();
    for sample in samples {
        predictions.extend(metrics::predictions(&pretrained.model, sample)?);
        tick();
    }
    Ok(expected_calibration_error(&predictions, bins))
}

/// `samples` sampled answers per high-entropy prompt, decoded in batches: sample `j` of prompt
/// `i` is item `i·k + j` of the repeated prompts, so it draws from stream `seed + i·k + j`
/// ([`GenerationConfig::stream`]), as it did one at a time.
fn sample_answers(
    pretrained: &Pretrained,
    template: &Template,
    run: &RunEval,
    tick: &mut dyn FnMut(),
) -> Result<Vec<(GenerationConfig, Answer)>> {
    let k = run.eval.samples;
    let config = GenerationConfig {
        max_new_tokens: run.eval.max_new_tokens,
        temperature: run.eval.temperature,
        top_p: run.eval.top_p,
        seed: run.eval.seed,
        ..Default::default()
    };
    let repeated: Vec<Example> = run
        .splits
        .high
        .iter()
        .flat_map(|example| std::iter::repeat_n(example.clone(), k))
        .collect();
    let answers = answers::answer_all(
        pretrained,
        template,
        &repeated,
        &config,
        Default::default(),
        answers::BATCH,
        |answer| {
            if (answer.index + 1).is_multiple_of(k) {
                tick();
            }
            Ok(())
        },
    )?;
    let out = answers
        .into_iter()
        .map(|mut answer| {
            let seed = config.seed + answer.index as u64;
            answer.index /= k;
            (
                GenerationConfig {
                    seed,
                    ..config.clone()
                },
                answer,
            )
        })
        .collect();
    Ok(out)
}

/// The authors' mean all-pairs silhouette over both splits' prompts.
fn silhouette(pretrained: &Pretrained, template: &Template, splits: &Splits) -> Result<f64> {
    let prompts: Vec<String> = splits
        .low
        .iter()
        .chain(&splits.high)
        .map(|e| answers::instruction(&e.body))
        .collect();
    let prompts = Prompts {
        template,
        raw: false,
        prompts: &prompts,
        max_seq_len: 1024,
    };
    Ok(clustering::analyse_pretrained(pretrained, "run", &prompts, || {})?.mean)
}

fn write_answers(path: &Path, answers: &[Answer], provenance: &Provenance) -> Result<()> {
    let lines: String = answers
        .iter()
        .map(|a| answers::answer_line(a, provenance) + "\n")
        .collect();
    crate::util::write_atomic(path, lines.as_bytes())
}
