//! `ual eval judge`: which of two answer sets to the same prompts an LLM judge prefers.
//!
//! Each prompt's pair is judged twice, `a` shown first and then `b` shown first, and counts
//! for one side only if both orders agree (`verdict::combine`), which cancels the judge's
//! position bias. The requests go through `llm`'s client: concurrency, retries with
//! backoff, `Retry-After`, follow-ups after a reply without a verdict, and a cache that makes a
//! re-run after any crash ask nothing twice. Rates come with seeded bootstrap intervals
//! (`interval`).

pub mod chart;
pub mod interval;
pub mod verdict;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use serde_json::{Value, json};

use crate::annotate::PromptPreset;
use crate::data::formats::{parse_line, response_text, text_lines};
use crate::llm::cache::{self, Cache};
use crate::llm::{self, Connection, Outcome as Asked, Work};
use interval::Rates;
use verdict::{Outcome, Verdict};

/// The authors' pairwise comparison prompt, verbatim (`prompts/README.md`), with `{question}`,
/// `{primary}` and `{secondary}`.
pub const LIMA_PROMPT: &str = include_str!("../../prompts/paper-lima-compare.txt");

/// One answer to one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// The question in words.
    pub instruction: String,
    /// The answer.
    pub text: String,
}

/// Reads a set of answers: `ual generate --input` lines (`instruction` and `generation`), or a
/// training-schema file whose responses are the references. Errors name the file, line and
/// field.
pub fn read_responses(path: &Path) -> Result<Vec<Response>> {
    text_lines(path)?
        .into_iter()
        .map(|(n, line)| response_of(&line, n).with_context(|| format!("{}:{n}", path.display())))
        .collect()
}

fn response_of(line: &str, n: usize) -> Result<Response> {
    let value: Value = serde_json::from_str(line).map_err(|e| anyhow!("malformed JSON: {e}"))?;
    if let Some(generation) = value.get("generation") {
        let field = |name: &str, v: Option<&Value>| {
            v.and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| anyhow!("field `{name}` must be a string"))
        };
        return Ok(Response {
            instruction: field("instruction", value.get("instruction"))?,
            text: field("generation", Some(generation))?,
        });
    }
    let example = parse_line(line, n)?;
    let instruction = crate::eval::answers::instruction(&example.body);
    let text = response_text(&example.body)
        .ok_or_else(|| anyhow!("field `messages` has no assistant turn to judge"))?
        .to_string();
    Ok(Response { instruction, text })
}

/// What a judging run was asked to do.
pub struct JudgeOptions {
    /// The answers under test.
    pub a: PathBuf,
    /// The answers they are compared with (another model's, or the references).
    pub b: PathBuf,
    /// The directory of `summary.json`, `judgments.jsonl`, `winrate.svg` and the cache.
    pub output: PathBuf,
    /// The endpoint and the client's settings.
    pub connection: Connection,
    /// A prompt with `{question}`, `{primary}` and `{secondary}`; without one, the authors'.
    pub prompt: Option<PathBuf>,
    /// Overrides the authors' `max_tokens` (4096).
    pub max_tokens: Option<u32>,
    /// Only the first N prompts.
    pub limit: Option<usize>,
    /// Bootstrap draws for the intervals.
    pub resamples: usize,
    /// The bootstrap's seed.
    pub seed: u64,
    /// Ask again for the orders whose cached reply held no verdict.
    pub retry_failed: bool,
}

/// One prompt's judgment, a line of `judgments.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct Judgment {
    /// 0-based position of the prompt.
    pub index: usize,
    /// The question.
    pub instruction: String,
    /// The verdict with `a` shown first, and the judge's reply.
    pub a_first: Option<Verdict>,
    /// The judge's reply with `a` shown first.
    pub a_first_reply: String,
    /// The verdict with `b` shown first.
    pub b_first: Option<Verdict>,
    /// The judge's reply with `b` shown first.
    pub b_first_reply: String,
    /// Both orders combined; `None` when an order got no verdict.
    pub outcome: Option<Outcome>,
    /// Why an order got no verdict (a timeout, an HTTP status, a refused connection, replies
    /// without a digit), for each order that got none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<String>,
}

/// `summary.json`: the counts and the rates.
#[derive(Debug, Clone, Serialize)]
pub struct JudgeSummary {
    /// The answers under test.
    pub a: String,
    /// What they were compared with.
    pub b: String,
    /// The judge's model name.
    pub judge: String,
    /// `lima` (the authors' prompt) or the prompt file.
    pub prompt: String,
    /// Prompts compared.
    pub prompts: usize,
    /// Prompts whose two orders both got a verdict.
    pub judged: usize,
    /// Prompts with an order that got none after the follow-ups.
    pub failed: usize,
    /// Prompts won by `a`.
    pub wins: usize,
    /// Prompts tied.
    pub ties: usize,
    /// Prompts lost by `a`.
    pub losses: usize,
    /// The rates over judged prompts, with 95% bootstrap intervals.
    pub rates: Rates,
    /// Bootstrap draws and seed.
    pub bootstrap: (usize, u64),
    /// Orders answered from the cache.
    pub cached: usize,
    /// Requests sent.
    pub requested: usize,
    /// Why requests got no verdict, each reason with its count, the most common first.
    pub failure_reasons: Vec<(String, usize)>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Judges every prompt's pair in both orders and writes the outputs.
pub fn run(options: &JudgeOptions) -> Result<JudgeSummary> {
    let started = Instant::now();
    let pairs = read_pairs(options)?;
    let template = judge_prompt(options)?;
    std::fs::create_dir_all(&options.output)
        .with_context(|| format!("cannot create {}", options.output.display()))?;
    let connection = &options.connection;
    // The authors' sampling settings (gpt4_lima_compare.py) are those of their elicitation.
    let params = PromptPreset::Paper.request_params(options.max_tokens);
    let endpoint = llm::connect(connection, params)?;
    // Request 2i shows a first; 2i + 1 shows b first.
    let prompts: Vec<String> = pairs
        .iter()
        .flat_map(|(a, b)| [render(&template, a, b), render(&template, b, a)])
        .collect();
    let keys: Vec<String> = prompts
        .iter()
        .map(|p| cache::key(&connection.model, p))
        .collect();
    let cache = Cache::open(&options.output.join("judge.cache.jsonl"))?;
    let mut asked = cached_answers(&cache, &keys, options.retry_failed);
    let cached = asked.iter().filter(|o| o.is_some()).count();
    let parse = |reply: &str| verdict::parse_verdict(reply).map(Verdict::score);
    let work = Work {
        endpoint: &endpoint,
        prompts: &prompts,
        keys: &keys,
        cache: &cache,
        parse: &parse,
        follow_up: verdict::FOLLOW_UP,
    };
    let (requested, fatal) = llm::ask_all(&work, connection.concurrency, &mut asked, started);
    if let Some(message) = fatal {
        bail!(
            "{}: {message}; judgments so far are kept in the cache, re-run to resume",
            connection.endpoint
        );
    }
    let reasons = failure_reasons(&asked);
    let mut judgments = judgments(&pairs, &keys, &cache);
    for j in &mut judgments {
        let orders = ["a first", "b first"].iter();
        for (order, reason) in orders.zip(&reasons[2 * j.index..2 * j.index + 2]) {
            if let Some(reason) = reason {
                j.failures.push(format!("{order}: {reason}"));
            }
        }
    }
    let outcomes: Vec<Outcome> = judgments.iter().filter_map(|j| j.outcome).collect();
    let count = |o: Outcome| outcomes.iter().filter(|&&x| x == o).count();
    let summary = JudgeSummary {
        a: options.a.display().to_string(),
        b: options.b.display().to_string(),
        judge: connection.model.clone(),
        prompt: options
            .prompt
            .as_ref()
            .map_or("lima".into(), |p| p.display().to_string()),
        prompts: pairs.len(),
        judged: outcomes.len(),
        failed: pairs.len() - outcomes.len(),
        wins: count(Outcome::Win),
        ties: count(Outcome::Tie),
        losses: count(Outcome::Loss),
        rates: interval::rates(&outcomes, options.resamples, options.seed),
        bootstrap: (options.resamples, options.seed),
        cached,
        requested,
        failure_reasons: most_common(reasons.into_iter().flatten()),
        seconds: started.elapsed().as_secs_f64(),
    };
    write_outputs(&options.output, &judgments, &summary)?;
    Ok(summary)
}

/// The judge's prompt: the file `--prompt` names, or LIMA's.
fn judge_prompt(options: &JudgeOptions) -> Result<String> {
    match &options.prompt {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
        }
        None => Ok(LIMA_PROMPT.to_string()),
    }
}

/// The cached answer of each request, if any; a failed one counts as unasked under
/// `--retry-failed`.
fn cached_answers(cache: &Cache, keys: &[String], retry_failed: bool) -> Vec<Option<Asked>> {
    keys.iter()
        .map(|k| {
            cache
                .get(k)
                .filter(|a| a.score.is_some() || !retry_failed)
                .map(|a| llm::outcome_of(&a))
        })
        .collect()
}

/// Why each request got no verdict, in request order; `None` where it got one.
fn failure_reasons(asked: &[Option<Asked>]) -> Vec<Option<String>> {
    asked
        .iter()
        .map(|a| match a {
            Some(Asked::Failed(reason)) => Some(reason.clone()),
            Some(_) => None,
            None => Some("not asked (the run stopped first)".into()),
        })
        .collect()
}

/// The two answer sets, paired prompt by prompt; they must ask the same questions in the same
/// order.
fn read_pairs(options: &JudgeOptions) -> Result<Vec<(Response, Response)>> {
    let (a, b) = (read_responses(&options.a)?, read_responses(&options.b)?);
    if a.len() != b.len() {
        bail!(
            "{} has {} answers but {} has {}: both must answer the same prompts",
            options.a.display(),
            a.len(),
            options.b.display(),
            b.len()
        );
    }
    if let Some(i) = (0..a.len()).find(|&i| a[i].instruction.trim() != b[i].instruction.trim()) {
        bail!(
            "answer {} differs in `instruction` between {} and {}: both must answer the same prompts in the same order",
            i + 1,
            options.a.display(),
            options.b.display()
        );
    }
    let n = options.limit.unwrap_or(a.len()).min(a.len());
    if n == 0 {
        bail!(
            "{} and {} hold no answers to judge{}",
            options.a.display(),
            options.b.display(),
            if a.is_empty() { "" } else { " (--limit 0)" }
        );
    }
    Ok(a.into_iter().zip(b).take(n).collect())
}

/// The prompt showing `first`'s answer first.
fn render(template: &str, first: &Response, second: &Response) -> String {
    template
        .replace("{question}", &first.instruction)
        .replace("{primary}", &first.text)
        .replace("{secondary}", &second.text)
}

/// Each prompt's two verdicts, read back from the cache every request is in.
fn judgments(pairs: &[(Response, Response)], keys: &[String], cache: &Cache) -> Vec<Judgment> {
    let read = |k: &String| {
        cache.get(k).map_or((None, String::new()), |a| {
            (a.score.and_then(Verdict::from_score), a.reply)
        })
    };
    pairs
        .iter()
        .enumerate()
        .map(|(index, (a, _))| {
            let (a_first, a_first_reply) = read(&keys[2 * index]);
            let (b_first, b_first_reply) = read(&keys[2 * index + 1]);
            Judgment {
                index,
                instruction: a.instruction.clone(),
                outcome: a_first.zip(b_first).map(|(x, y)| verdict::combine(x, y)),
                a_first,
                a_first_reply,
                b_first,
                b_first_reply,
                failures: Vec::new(),
            }
        })
        .collect()
}

/// Each distinct reason with its count, the most common first.
fn most_common(reasons: impl Iterator<Item = String>) -> Vec<(String, usize)> {
    let mut counts = std::collections::BTreeMap::new();
    for r in reasons {
        *counts.entry(r).or_insert(0usize) += 1;
    }
    let mut counts: Vec<(String, usize)> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    counts
}

fn write_outputs(dir: &Path, judgments: &[Judgment], summary: &JudgeSummary) -> Result<()> {
    let lines: String = judgments
        .iter()
        .map(|j| json!(j).to_string() + "\n")
        .collect();
    crate::util::write_atomic(&dir.join("judgments.jsonl"), lines.as_bytes())?;
    chart::draw(summary, &dir.join("winrate.svg"))?;
    crate::util::write_atomic(
        &dir.join("summary.json"),
        (serde_json::to_string_pretty(summary)? + "\n").as_bytes(),
    )
}

/// The summary in one paragraph.
pub fn describe(s: &JudgeSummary) -> String {
    let pct = |r: &interval::Rate| {
        format!(
            "{:.1}% [{:.1}, {:.1}]",
            100.0 * r.value,
            100.0 * r.ci95[0],
            100.0 * r.ci95[1]
        )
    };
    format!(
        "{} prompts: {} judged, {} failed; {} from cache, {} requests; {:.1} s\n\
         a wins {} ({}), ties {} ({}), loses {} ({}); preference for a {} (95% bootstrap)\n",
        s.prompts,
        s.judged,
        s.failed,
        s.cached,
        s.requested,
        s.seconds,
        s.wins,
        pct(&s.rates.win),
        s.ties,
        pct(&s.rates.tie),
        s.losses,
        pct(&s.rates.loss),
        pct(&s.rates.preference)
    )
}
