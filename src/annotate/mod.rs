//! `ual annotate`: adds an `uncertainty` score to every line of a JSONL file, asked of a more
//! capable LLM behind an OpenAI-compatible endpoint (the paper's elicitation), or computed
//! from a local model's predictive entropy.
//!
//! Output lines are the input lines unchanged plus `uncertainty` and `uncertainty_source`, in
//! input order, written to a temporary file and renamed. Every answered request is in
//! `OUT.cache.jsonl` the moment it arrives, so re-running the same command after any crash asks
//! nothing twice. Lines without a valid score go to `OUT.failed.jsonl` with the reason.

pub mod cache;
pub mod client;
pub mod local;
pub mod parse;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::data::formats::{Body, parse_line};
use cache::{Answer, Cache};
use client::{Endpoint, Failure};

/// The paper's elicitation (UAL-PAPER.md): how open-ended is the correct response, 1 to 10.
pub const DEFAULT_PROMPT: &str = "You will see an instruction, an optional input, and a reference response.\n\
Rate how uncertain, or how open-ended, the correct response to the instruction is, on an integer \
scale from 1 to 10: 1 means there is exactly one correct answer (as in arithmetic), 10 means there \
are many equally good answers (as in creative writing).\n\n\
Instruction:\n{instruction}\n\nInput:\n{input}\n\nReference response:\n{response}\n\n\
Answer with the number only.";

const FOLLOW_UP: &str = "Your reply did not contain a valid score. Reply with a single integer from 1 to 10 and nothing else.";

/// Stricter follow-ups after a reply without a valid score, before the line counts as failed.
const FOLLOW_UPS: usize = 2;

/// One line's fields for the prompt, and the line itself to copy to the output.
pub struct Line {
    pub object: Map<String, Value>,
    pub instruction: String,
    pub input: String,
    pub response: String,
}

/// Reads `path`; each line must be a training-schema object (errors name file, line and field).
pub fn read_lines(path: &Path, limit: Option<usize>) -> Result<Vec<Line>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut lines = Vec::new();
    for (i, raw) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        if limit.is_some_and(|n| lines.len() >= n) {
            break;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let example = parse_line(raw, i + 1).with_context(at)?;
        let Ok(Value::Object(object)) = serde_json::from_str::<Value>(raw) else {
            bail!("{}: expected a JSON object", at())
        };
        let (instruction, input, response) = match example.body {
            Body::Alpaca {
                instruction,
                input,
                output,
            } => (instruction, input, output),
            Body::Completion { prompt, completion } => (prompt, String::new(), completion),
            Body::Chat { messages } => {
                let last = messages
                    .iter()
                    .rposition(|m| m.role == "assistant")
                    .unwrap_or(0);
                let asked: Vec<&str> = messages[..last]
                    .iter()
                    .map(|m| m.content.as_str())
                    .collect();
                (
                    asked.join("\n\n"),
                    String::new(),
                    messages[last].content.clone(),
                )
            }
        };
        lines.push(Line {
            object,
            instruction,
            input,
            response,
        });
    }
    Ok(lines)
}

/// `template` with `{instruction}`, `{input}` and `{response}` filled in.
pub fn render_prompt(template: &str, line: &Line) -> String {
    let input = if line.input.trim().is_empty() {
        "(none)"
    } else {
        line.input.as_str()
    };
    template
        .replace("{instruction}", &line.instruction)
        .replace("{input}", input)
        .replace("{response}", &line.response)
}

/// What the command was asked to do against an endpoint.
pub struct ApiOptions {
    pub input: PathBuf,
    pub output: PathBuf,
    pub endpoint: String,
    pub model: String,
    pub api_key_env: String,
    pub concurrency: usize,
    pub prompt: Option<PathBuf>,
    pub limit: Option<usize>,
    pub max_retries: u32,
    pub timeout: Duration,
    pub retry_base: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub lines: usize,
    pub scored: usize,
    /// Answers taken from the cache rather than asked.
    pub cached: usize,
    pub requested: usize,
    pub failed: usize,
    pub seconds: f64,
    /// Lines per integer score bucket 1..=10.
    pub histogram: Vec<(u32, usize)>,
}

enum Outcome {
    Scored(f64),
    Failed(String),
}

/// Annotates `options.input` through the endpoint.
pub fn run_api(options: &ApiOptions) -> Result<Summary> {
    let started = Instant::now();
    warn_if_plain_http(&options.endpoint);
    let api_key = std::env::var(&options.api_key_env)
        .ok()
        .filter(|k| !k.is_empty());
    if api_key.is_none() {
        eprintln!(
            "note: ${} is not set; requests carry no API key",
            options.api_key_env
        );
    }
    let template = match &options.prompt {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?,
        None => DEFAULT_PROMPT.to_string(),
    };
    let lines = read_lines(&options.input, options.limit)?;
    let prompts: Vec<String> = lines.iter().map(|l| render_prompt(&template, l)).collect();
    let keys: Vec<String> = prompts
        .iter()
        .map(|p| cache::key(&options.model, p))
        .collect();
    let cache = Cache::open(&sibling(&options.output, "cache.jsonl"))?;
    let endpoint = Endpoint::new(
        &options.endpoint,
        &options.model,
        api_key,
        options.timeout,
        options.max_retries,
        options.retry_base,
    )?;

    let mut outcomes: Vec<Option<Outcome>> =
        keys.iter().map(|k| cache.get(k).map(outcome_of)).collect();
    let cached = outcomes.iter().filter(|o| o.is_some()).count();
    let todo: Vec<usize> = (0..lines.len())
        .filter(|&i| outcomes[i].is_none())
        .collect();
    let progress = ProgressBar::new(lines.len() as u64).with_position(cached as u64);
    progress.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]")
            .expect("static template"),
    );
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (sender, receiver) = mpsc::channel::<(usize, Result<Answer, Failure>)>();
    let (mut requested, mut failed, mut fatal) = (0usize, 0usize, None);
    std::thread::scope(|scope| {
        for _ in 0..options.concurrency.clamp(1, 256) {
            let sender = sender.clone();
            let (next, stop, todo, prompts, keys, endpoint, cache) =
                (&next, &stop, &todo, &prompts, &keys, &endpoint, &cache);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Some(&i) = todo.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        break;
                    };
                    let result = ask(endpoint, &prompts[i], &keys[i]);
                    match &result {
                        // Stop the other workers before they send another doomed request.
                        Err(Failure::Fatal(_)) => stop.store(true, Ordering::SeqCst),
                        Ok(answer) if cache.record(answer).is_err() => {
                            stop.store(true, Ordering::SeqCst)
                        }
                        _ => {}
                    }
                    if sender.send((i, result)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(sender);
        for (i, result) in receiver {
            requested += 1;
            match result {
                Ok(answer) => outcomes[i] = Some(outcome_of(&answer)),
                Err(Failure::GaveUp(reason)) => outcomes[i] = Some(Outcome::Failed(reason)),
                Err(Failure::Fatal(message)) => {
                    stop.store(true, Ordering::Relaxed);
                    fatal.get_or_insert(message);
                }
            }
            if matches!(outcomes[i], Some(Outcome::Failed(_))) {
                failed += 1;
            }
            let rate = requested as f64 / started.elapsed().as_secs_f64();
            progress.set_message(format!("{cached} cached, {failed} failed, {rate:.1} req/s"));
            progress.inc(1);
        }
    });
    progress.finish();
    if let Some(message) = fatal {
        bail!(
            "{}: {message}; answers so far are kept in the cache, re-run to resume",
            options.endpoint
        );
    }
    let source = format!("model:{}", options.model);
    write_outputs(
        &options.output,
        &lines,
        &outcomes,
        &source,
        started,
        cached,
        requested,
    )
}

/// Asks for a score, following up on replies without one.
fn ask(endpoint: &Endpoint, prompt: &str, key: &str) -> Result<Answer, Failure> {
    let mut messages = vec![json!({ "role": "user", "content": prompt })];
    let mut reply = String::new();
    for _ in 0..=FOLLOW_UPS {
        reply = endpoint.chat(&messages)?;
        if let Some(score) = parse::parse_score(&reply) {
            return Ok(Answer {
                key: key.to_string(),
                score: Some(score),
                reply,
            });
        }
        messages.push(json!({ "role": "assistant", "content": reply }));
        messages.push(json!({ "role": "user", "content": FOLLOW_UP }));
    }
    Ok(Answer {
        key: key.to_string(),
        score: None,
        reply,
    })
}

fn outcome_of(answer: &Answer) -> Outcome {
    match answer.score {
        Some(score) => Outcome::Scored(score),
        None => {
            let reply: String = answer.reply.chars().take(120).collect();
            Outcome::Failed(format!(
                "no valid score after {FOLLOW_UPS} follow-ups; last reply {reply:?}"
            ))
        }
    }
}

/// Writes `OUT` (scored lines, input order) and `OUT.failed.jsonl`, each atomically.
fn write_outputs(
    output: &Path,
    lines: &[Line],
    outcomes: &[Option<Outcome>],
    source: &str,
    started: Instant,
    cached: usize,
    requested: usize,
) -> Result<Summary> {
    let (mut scored, mut failed) = (String::new(), String::new());
    let mut histogram = vec![0usize; 10];
    for (line, outcome) in lines.iter().zip(outcomes) {
        let mut object = line.object.clone();
        match outcome {
            Some(Outcome::Scored(score)) => {
                object.insert("uncertainty".into(), json!(score));
                object.insert("uncertainty_source".into(), json!(source));
                scored.push_str(&(Value::Object(object).to_string() + "\n"));
                histogram[(score.round() as usize).clamp(1, 10) - 1] += 1;
            }
            Some(Outcome::Failed(reason)) => {
                object.insert("reason".into(), json!(reason));
                failed.push_str(&(Value::Object(object).to_string() + "\n"));
            }
            None => bail!("internal error: a line was neither scored nor failed"),
        }
    }
    crate::util::write_atomic(output, scored.as_bytes())?;
    let failed_path = sibling(output, "failed.jsonl");
    let failed_count = failed.lines().count();
    if failed_count > 0 {
        crate::util::write_atomic(&failed_path, failed.as_bytes())?;
    } else {
        let _ = std::fs::remove_file(&failed_path);
    }
    Ok(Summary {
        lines: lines.len(),
        scored: lines.len() - failed_count,
        cached,
        requested,
        failed: failed_count,
        seconds: started.elapsed().as_secs_f64(),
        histogram: (1..=10).zip(histogram).collect(),
    })
}

/// `OUT.<suffix>` next to the output file.
pub fn sibling(output: &Path, suffix: &str) -> PathBuf {
    let mut name = output
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".{suffix}"));
    output.with_file_name(name)
}

fn warn_if_plain_http(endpoint: &str) {
    let Some(rest) = endpoint.strip_prefix("http://") else {
        return;
    };
    let host = rest.split(['/', ':']).next().unwrap_or_default();
    if !matches!(host, "localhost" | "127.0.0.1" | "[" | "::1") && !rest.starts_with("[::1]") {
        eprintln!(
            "warning: {endpoint} is plain http to another host; the API key travels unencrypted"
        );
    }
}

/// The end-of-run summary as text: counts, then a small histogram of the scores.
pub fn describe(summary: &Summary) -> String {
    let mut text = format!(
        "{} lines: {} scored, {} failed; {} from cache, {} requests; {:.1} s\n",
        summary.lines,
        summary.scored,
        summary.failed,
        summary.cached,
        summary.requested,
        summary.seconds
    );
    let widest = summary
        .histogram
        .iter()
        .map(|(_, n)| *n)
        .max()
        .unwrap_or(0)
        .max(1);
    for (score, n) in &summary.histogram {
        text.push_str(&format!(
            "{score:>3} | {:<40} {n}\n",
            "#".repeat(n * 40 / widest)
        ));
    }
    text
}
