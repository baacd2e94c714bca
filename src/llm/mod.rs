//! The client of an OpenAI-compatible LLM endpoint that annotation and the judge share: the
//! connection's settings, one endpoint with its retries and backoff (`client`), the on-disk
//! cache of answers (`cache`), and the request loop that asks many prompts at a time, following
//! up on replies that hold no score.

pub mod cache;
pub mod client;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value, json};

use cache::{Answer, Cache};
use client::{Endpoint, Failure};

/// Stricter follow-ups after a reply without a valid score, before the request counts as
/// failed.
const FOLLOW_UPS: usize = 2;

/// An OpenAI-compatible endpoint and how to ask it: what annotation and the judge share.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The server's base URL.
    pub endpoint: String,
    /// The model name the server serves.
    pub model: String,
    /// The environment variable that holds the API key.
    pub api_key_env: String,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Retries per request on connection errors, timeouts, 429 and 5xx.
    pub max_retries: u32,
    /// How long one request may take.
    pub timeout: Duration,
    /// The first backoff delay; it doubles per retry.
    pub retry_base: Duration,
    /// The longest wait a server's `Retry-After` gets.
    pub max_wait: Duration,
}

/// What became of one request: a score (or verdict), or the reason there is none.
pub(crate) enum Outcome {
    /// The reply held one.
    Scored(f64),
    /// Every follow-up failed, or the request gave up.
    Failed(String),
}

/// The endpoint `connection` names, with the API key from the environment when there is one,
/// sending `params` besides the messages.
pub(crate) fn connect(connection: &Connection, params: Map<String, Value>) -> Result<Endpoint> {
    check_endpoint(&connection.endpoint)?;
    warn_if_plain_http(&connection.endpoint);
    let api_key = std::env::var(&connection.api_key_env)
        .ok()
        .filter(|k| !k.is_empty());
    if api_key.is_none() {
        eprintln!(
            "note: ${} is not set; requests carry no API key",
            connection.api_key_env
        );
    }
    Ok(Endpoint::new(
        &connection.endpoint,
        &connection.model,
        api_key,
        connection.timeout,
        connection.max_retries,
        connection.retry_base,
    )?
    .with_params(params)
    .with_max_wait(connection.max_wait))
}

/// What every worker reads: the endpoint, each request's prompt and cache key, the cache, and
/// how a reply is read.
pub(crate) struct Work<'a> {
    /// Where requests go.
    pub endpoint: &'a Endpoint,
    /// Each request's prompt.
    pub prompts: &'a [String],
    /// Each request's cache key.
    pub keys: &'a [String],
    /// Answers already received.
    pub cache: &'a Cache,
    /// The score (or verdict) in a reply, if it holds one.
    pub parse: &'a (dyn Fn(&str) -> Option<f64> + Sync),
    /// What is asked after a reply without one.
    pub follow_up: &'a str,
}

/// Asks for every line without an outcome, `concurrency` requests at a time, filling in
/// `outcomes`; returns the requests made and the first fatal error, after which no new request
/// is sent.
pub(crate) fn ask_all(
    work: &Work,
    concurrency: usize,
    outcomes: &mut [Option<Outcome>],
    started: Instant,
) -> (usize, Option<String>) {
    let cached = outcomes.iter().filter(|o| o.is_some()).count();
    let todo: Vec<usize> = (0..outcomes.len())
        .filter(|&i| outcomes[i].is_none())
        .collect();
    let progress = ProgressBar::new(outcomes.len() as u64).with_position(cached as u64);
    progress.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]")
            .expect("static template"),
    );
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (sender, receiver) = mpsc::channel::<(usize, Result<Answer, Failure>)>();
    let (mut requested, mut failed, mut fatal) = (0usize, 0usize, None);
    std::thread::scope(|scope| {
        for _ in 0..concurrency.clamp(1, 256) {
            let sender = sender.clone();
            let (next, stop, todo) = (&next, &stop, &todo);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Some(&i) = todo.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        break;
                    };
                    let result = ask(work, i);
                    match &result {
                        // Stop the other workers before they send another doomed request.
                        Err(Failure::Fatal(_)) => stop.store(true, Ordering::SeqCst),
                        Ok(answer) if work.cache.record(answer).is_err() => {
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
    (requested, fatal)
}

/// Asks request `i`, following up on replies without a score.
fn ask(work: &Work, i: usize) -> Result<Answer, Failure> {
    let mut messages = vec![json!({ "role": "user", "content": work.prompts[i] })];
    let mut reply = String::new();
    for _ in 0..=FOLLOW_UPS {
        reply = work.endpoint.chat(&messages)?;
        if let Some(score) = (work.parse)(&reply) {
            return Ok(Answer {
                key: work.keys[i].clone(),
                score: Some(score),
                reply,
            });
        }
        messages.push(json!({ "role": "assistant", "content": reply }));
        messages.push(json!({ "role": "user", "content": work.follow_up }));
    }
    Ok(Answer {
        key: work.keys[i].clone(),
        score: None,
        reply,
    })
}

/// A cached or fresh answer as an outcome.
pub(crate) fn outcome_of(answer: &Answer) -> Outcome {
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

/// A wrong URL stops before the first request: an http(s) URL with a host, or one line saying
/// what it is not.
fn check_endpoint(endpoint: &str) -> Result<()> {
    let url = reqwest::Url::parse(endpoint).map_err(|e| {
        anyhow::anyhow!(
            "--endpoint {endpoint:?} is not a URL ({e}); expected e.g. http://localhost:8000"
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        bail!(
            "--endpoint {endpoint:?}: expected an http:// or https:// URL with a host, e.g. http://localhost:8000"
        );
    }
    Ok(())
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
