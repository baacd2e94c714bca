//! `ual annotate`: adds an `uncertainty` score to every line of a JSONL file, asked of a more
//! capable LLM behind an OpenAI-compatible endpoint (as UAL elicits it), or computed from a
//! local model's predictive entropy.
//!
//! Two prompts are built in. `ual` (the default) is ual's own: how open-ended is the correct
//! response, 1 to 10. `paper` is the authors' verbatim (`prompts/paper-diversity-0-99.txt`):
//! the need for diversity in the dialogue, 0 to 99, sent as they sent it.
//!
//! Output lines are the input lines unchanged plus `uncertainty` and `uncertainty_source`, in
//! input order, written to a temporary file and renamed. Every answered request is in
//! `OUT.cache.jsonl` the moment it arrives, so re-running the same command after any crash asks
//! nothing twice. Lines without a valid score go to `OUT.failed.jsonl` with the reason.

pub mod local;
pub mod parse;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::data::formats::{Body, parse_line};
use crate::llm::cache::{self, Cache};
use crate::llm::{Connection, Outcome, Work, ask_all, connect, outcome_of};

/// ual's own elicitation prompt (not the authors'): how open-ended is the correct response,
/// 1 to 10.
pub const DEFAULT_PROMPT: &str = "You will see an instruction, an optional input, and a reference response.\n\
Rate how uncertain, or how open-ended, the correct response to the instruction is, on an integer \
scale from 1 to 10: 1 means there is exactly one correct answer (as in arithmetic), 10 means there \
are many equally good answers (as in creative writing).\n\n\
Instruction:\n{instruction}\n\nInput:\n{input}\n\nReference response:\n{response}\n\n\
Answer with the number only.";

/// The authors' prompt, verbatim, with `{example}` for the sample's turns (see prompts/README.md).
pub const PAPER_PROMPT: &str = include_str!("../../prompts/paper-diversity-0-99.txt");

/// Which built-in elicitation a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PromptPreset {
    /// ual's 1–10 "how open-ended" prompt, temperature 0.
    #[default]
    Ual,
    /// The authors' 0–99 "need for diversity" prompt, temperature 0, top_p 0.9, max_tokens 4096.
    Paper,
}

impl PromptPreset {
    /// The preset's prompt text.
    pub fn prompt(self) -> &'static str {
        match self {
            Self::Ual => DEFAULT_PROMPT,
            Self::Paper => PAPER_PROMPT,
        }
    }

    /// The scale the preset's prompt asks for: `[min, max]`.
    pub fn scale(self) -> [f64; 2] {
        match self {
            Self::Ual => crate::uncertainty::UAL_SCALE,
            Self::Paper => crate::uncertainty::PAPER_SCALE,
        }
    }

    /// The sampling fields of each request besides the messages (`gpt4_ent_score.py`'s for
    /// the authors' preset).
    pub fn request_params(self, max_tokens: Option<u32>) -> Map<String, Value> {
        let mut params = Map::new();
        params.insert("temperature".into(), json!(0));
        if self == Self::Paper {
            params.insert("top_p".into(), json!(0.9));
            params.insert("max_tokens".into(), json!(4096));
        }
        if let Some(n) = max_tokens {
            params.insert("max_tokens".into(), json!(n));
        }
        params
    }
}

fn follow_up([min, max]: [f64; 2]) -> String {
    format!(
        "Your reply did not contain a valid score. Reply with a single integer from {min} to {max} and nothing else."
    )
}

/// One line's fields for the prompt, and the line itself to copy to the output.
pub struct Line {
    /// The line's JSON object, written back with its score added.
    pub object: Map<String, Value>,
    /// The instruction, or the user's turns.
    pub instruction: String,
    /// An Alpaca line's input (empty otherwise).
    pub input: String,
    /// The reference response.
    pub response: String,
    /// The turns joined with newlines, without speakers (the authors' `{example}`).
    pub example: String,
}

/// Reads `path`; each line must be a training-schema object (errors name file, line and field).
pub fn read_lines(path: &Path, limit: Option<usize>) -> Result<Vec<Line>> {
    let mut lines = Vec::new();
    for (n, raw) in crate::data::formats::text_lines(path)? {
        if limit.is_some_and(|limit| lines.len() >= limit) {
            break;
        }
        let at = || format!("{}:{n}", path.display());
        let example = parse_line(&raw, n).with_context(at)?;
        let Ok(Value::Object(object)) = serde_json::from_str::<Value>(&raw) else {
            bail!("{}: expected a JSON object", at())
        };
        let plain = crate::data::formats::plain_text(&example.body);
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
            example: plain,
        });
    }
    Ok(lines)
}

/// `template` with `{instruction}`, `{input}`, `{response}` and `{example}` filled in.
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
        .replace("{example}", &line.example)
}

/// What the command was asked to do against an endpoint.
pub struct ApiOptions {
    /// The JSONL file to score.
    pub input: PathBuf,
    /// The scored file, written whole at the end.
    pub output: PathBuf,
    /// The endpoint and the client's settings.
    pub connection: Connection,
    /// A prompt file; without one, the preset's prompt.
    pub prompt: Option<PathBuf>,
    /// The built-in prompt and sampling settings.
    pub preset: PromptPreset,
    /// The scale replies are read on: `[min, max]`.
    pub scale: [f64; 2],
    /// Overrides the preset's `max_tokens`.
    pub max_tokens: Option<u32>,
    /// Only the first N lines.
    pub limit: Option<usize>,
    /// Ask again for lines whose cached reply held no score.
    pub retry_failed: bool,
}

/// What an annotation run did.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Lines read.
    pub lines: usize,
    /// Lines that got a score.
    pub scored: usize,
    /// Answers taken from the cache rather than asked.
    pub cached: usize,
    /// Requests sent.
    pub requested: usize,
    /// Lines that failed.
    pub failed: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Lines per score bucket, each named by its lowest score: one per integer on a scale of
    /// up to 20 points, else ten of equal width.
    pub histogram: Vec<(f64, usize)>,
}

/// Annotates `options.input` through the endpoint.
pub fn run_api(options: &ApiOptions) -> Result<Summary> {
    let started = Instant::now();
    let connection = &options.connection;
    let endpoint = connect(
        connection,
        options.preset.request_params(options.max_tokens),
    )?;
    let template = match &options.prompt {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?,
        None => options.preset.prompt().to_string(),
    };
    let lines = read_lines(&options.input, options.limit)?;
    let prompts: Vec<String> = lines.iter().map(|l| render_prompt(&template, l)).collect();
    let keys: Vec<String> = prompts
        .iter()
        .map(|p| cache::key(&connection.model, p))
        .collect();
    let cache = Cache::open(&sibling(&options.output, "cache.jsonl"))?;
    // A cached reply without a score is a failure; --retry-failed asks again.
    let mut outcomes: Vec<Option<Outcome>> = keys
        .iter()
        .map(|k| {
            cache
                .get(k)
                .filter(|a| a.score.is_some() || !options.retry_failed)
        })
        .map(|a| a.as_ref().map(outcome_of))
        .collect();
    let cached = outcomes.iter().filter(|o| o.is_some()).count();
    let scale = options.scale;
    let work = Work {
        endpoint: &endpoint,
        prompts: &prompts,
        keys: &keys,
        cache: &cache,
        parse: &|reply: &str| parse::parse_score(reply, scale),
        follow_up: &follow_up(scale),
    };
    let (requested, fatal) = ask_all(&work, connection.concurrency, &mut outcomes, started);
    if let Some(message) = fatal {
        bail!(
            "{}: {message}; answers so far are kept in the cache, re-run to resume",
            connection.endpoint
        );
    }
    let source = format!("model:{}", connection.model);
    let counts = (started, cached, requested);
    write_outputs(
        &options.output,
        &lines,
        &outcomes,
        &source,
        options.scale,
        counts,
    )
}

/// Writes `OUT` (scored lines, input order) and `OUT.failed.jsonl`, each atomically.
fn write_outputs(
    output: &Path,
    lines: &[Line],
    outcomes: &[Option<Outcome>],
    source: &str,
    scale: [f64; 2],
    (started, cached, requested): (Instant, usize, usize),
) -> Result<Summary> {
    let (mut scored, mut failed) = (String::new(), String::new());
    let bins = Bins::of(scale);
    let mut histogram = vec![0usize; bins.count];
    for (line, outcome) in lines.iter().zip(outcomes) {
        let mut object = line.object.clone();
        match outcome {
            Some(Outcome::Scored(score)) => {
                object.insert("uncertainty".into(), json!(score));
                object.insert("uncertainty_source".into(), json!(source));
                scored.push_str(&(Value::Object(object).to_string() + "\n"));
                histogram[bins.index(*score)] += 1;
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
        histogram: (0..bins.count)
            .map(|b| bins.lowest(b))
            .zip(histogram)
            .collect(),
    })
}

/// The histogram's buckets over a scale.
struct Bins {
    min: f64,
    width: f64,
    count: usize,
}

impl Bins {
    fn of([min, max]: [f64; 2]) -> Self {
        let points = (max - min).floor() as usize + 1;
        let width = if points <= 20 {
            1.0
        } else {
            (points as f64 / 10.0).ceil()
        };
        Self {
            min,
            width,
            count: (points as f64 / width).ceil() as usize,
        }
    }

    fn index(&self, score: f64) -> usize {
        let step = if self.width == 1.0 {
            (score - self.min).round()
        } else {
            ((score - self.min) / self.width).floor()
        };
        (step.max(0.0) as usize).min(self.count - 1)
    }

    fn lowest(&self, bin: usize) -> f64 {
        self.min + bin as f64 * self.width
    }
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
