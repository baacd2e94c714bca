//! One OpenAI-compatible chat endpoint, with the fault handling a 100k-line run needs:
//! exponential backoff with jitter on connection errors, timeouts and 5xx; `Retry-After` on
//! 429; an immediate stop on other 4xx, which retrying cannot fix.
//!
//! The API key is sent as a bearer token and appears in no error, log or file.

use std::time::Duration;

use rand::Rng;
use serde_json::{Value, json};

/// Why a request produced no reply.
#[derive(Debug, Clone)]
pub enum Failure {
    /// Retrying cannot help (a wrong key, model or URL): the run stops.
    Fatal(String),
    /// Transient faults outlasted the retries: this line fails, the run goes on.
    GaveUp(String),
}

/// An OpenAI-compatible chat-completions endpoint with retries.
pub struct Endpoint {
    client: reqwest::blocking::Client,
    url: String,
    model: String,
    api_key: Option<String>,
    max_retries: u32,
    retry_base: Duration,
    /// Sampling fields sent with every request (temperature, top_p, max_tokens).
    params: serde_json::Map<String, Value>,
}

/// The longest `Retry-After` honoured; a server asking for more (or for a negative, infinite
/// or unreadable delay) gets this.
const MAX_RETRY_AFTER: f64 = 300.0;

impl Endpoint {
    /// An endpoint at `base` serving `model`; fails on a malformed URL.
    pub fn new(
        base: &str,
        model: &str,
        api_key: Option<String>,
        timeout: Duration,
        max_retries: u32,
        retry_base: Duration,
    ) -> anyhow::Result<Self> {
        // No idle keep-alive connections: a server closing one while a request is put on it
        // turns into a spurious error and a duplicate request, which costs a paid call.
        let client = reqwest::blocking::Client::builder()
            .timeout(timeout)
            .pool_max_idle_per_host(0)
            .build()?;
        let url = format!(
            "{}/v1/chat/completions",
            base.trim_end_matches('/').trim_end_matches("/v1")
        );
        Ok(Self {
            client,
            url,
            model: model.to_string(),
            api_key,
            max_retries,
            retry_base,
            params: serde_json::Map::from_iter([("temperature".to_string(), json!(0))]),
        })
    }

    /// Sends `params` (e.g. temperature, top_p, max_tokens) with every request.
    pub fn with_params(mut self, params: serde_json::Map<String, Value>) -> Self {
        self.params = params;
        self
    }

    /// The assistant's reply to `messages` (OpenAI `{"role", "content"}` objects).
    pub fn chat(&self, messages: &[Value]) -> Result<String, Failure> {
        let mut body = self.params.clone();
        body.insert("model".into(), json!(self.model));
        body.insert("messages".into(), json!(messages));
        let body = Value::Object(body);
        let mut last = String::new();
        for attempt in 0..=self.max_retries {
            let mut request = self.client.post(&self.url).json(&body);
            if let Some(key) = &self.api_key {
                request = request.bearer_auth(key);
            }
            let wait = match request.send() {
                Err(e) => {
                    last = if e.is_timeout() {
                        "request timed out".into()
                    } else {
                        "connection failed".into()
                    };
                    self.backoff(attempt)
                }
                Ok(response) => {
                    let status = response.status();
                    let retry_after = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok()?.trim().parse::<f64>().ok());
                    let text = response.text().unwrap_or_default();
                    if status.is_success() {
                        return reply_content(&text)
                            .ok_or_else(|| Failure::GaveUp("malformed completion JSON".into()));
                    }
                    last = format!("HTTP {}", status.as_u16());
                    if status.as_u16() == 429 {
                        retry_after
                            .map(|s| {
                                let s = if s.is_finite() { s } else { MAX_RETRY_AFTER };
                                Duration::from_secs_f64(s.clamp(0.0, MAX_RETRY_AFTER))
                            })
                            .unwrap_or_else(|| self.backoff(attempt))
                    } else if status.is_server_error() {
                        self.backoff(attempt)
                    } else {
                        return Err(Failure::Fatal(client_error(
                            status.as_u16(),
                            &text,
                            &self.model,
                        )));
                    }
                }
            };
            if attempt < self.max_retries {
                std::thread::sleep(wait);
            }
        }
        Err(Failure::GaveUp(format!(
            "{last} after {} retries",
            self.max_retries
        )))
    }

    /// base · 2^attempt, capped at 30 s, times a jitter in [0.5, 1.5).
    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.retry_base.as_secs_f64() * 2f64.powi(attempt.min(16) as i32);
        Duration::from_secs_f64(base.min(30.0) * rand::rng().random_range(0.5..1.5))
    }
}

fn reply_content(text: &str) -> Option<String> {
    let v: Value = serde_json::from_str(text).ok()?;
    Some(v["choices"][0]["message"]["content"].as_str()?.to_string())
}

/// A one-line explanation of a 4xx, with the server's own message when it gives one.
fn client_error(status: u16, body: &str, model: &str) -> String {
    let detail = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_default();
    let hint = match status {
        401 | 403 => {
            "the API key was refused; check the variable named by --api-key-env".to_string()
        }
        404 => format!("not found; check --endpoint and that model {model:?} exists"),
        _ => "the endpoint rejected the request".to_string(),
    };
    let detail: String = detail.chars().take(200).collect();
    if detail.is_empty() {
        format!("HTTP {status}: {hint}")
    } else {
        format!("HTTP {status}: {hint} ({detail})")
    }
}
