//! One OpenAI-compatible chat endpoint, with the fault handling a 100k-line run needs:
//! exponential backoff with jitter on connection errors, timeouts and 5xx; `Retry-After` on
//! 429; an immediate stop on other 4xx, which retrying cannot fix.
//!
//! The API key is sent as a bearer token and appears in no error, log or file.

use std::time::{Duration, SystemTime};

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
    /// The longest `Retry-After` honoured.
    max_wait: Duration,
    /// Sampling fields sent with every request (temperature, top_p, max_tokens).
    params: serde_json::Map<String, Value>,
}

/// The longest `Retry-After` honoured unless [`Endpoint::with_max_wait`] says otherwise.
pub const MAX_WAIT: Duration = Duration::from_secs(300);

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
            max_wait: MAX_WAIT,
            params: serde_json::Map::from_iter([("temperature".to_string(), json!(0))]),
        })
    }

    /// Waits at most `max_wait` when a server asks for longer with `Retry-After`.
    pub fn with_max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
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
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| retry_after(v, SystemTime::now(), self.max_wait));
                    let text = match response.text() {
                        Ok(text) => text,
                        // The headers came, the body did not: as retryable as a timeout.
                        Err(e) => {
                            last = match e.is_timeout() {
                                true => "the response body timed out".into(),
                                false => "the response body was cut off".into(),
                            };
                            if attempt < self.max_retries {
                                std::thread::sleep(self.backoff(attempt));
                            }
                            continue;
                        }
                    };
                    if status.is_success() {
                        return completion(&text);
                    }
                    last = format!("HTTP {}", status.as_u16());
                    if status.as_u16() == 429 {
                        retry_after.unwrap_or_else(|| self.backoff(attempt))
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

/// The delay a `Retry-After` value asks for (RFC 9110 §10.2.3: delay-seconds, a run of digits,
/// or an HTTP date), at most `max_wait`; a date in the past is no delay. `None` for anything
/// else (negative, fractional, `inf`, `NaN`, garbage), which gets the ordinary backoff.
pub fn retry_after(value: &str, now: SystemTime, max_wait: Duration) -> Option<Duration> {
    let value = value.trim();
    let wait = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for a u64 is still a long wait.
        Duration::from_secs(value.parse().unwrap_or(u64::MAX))
    } else {
        let date = httpdate::parse_http_date(value).ok()?;
        date.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(max_wait))
}

/// The assistant's text of a 200 reply. A body that is not JSON at all (a web page, a proxy's
/// login form) means the URL is not a chat-completions endpoint, which no retry fixes.
fn completion(text: &str) -> Result<String, Failure> {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        let start: String = text.trim_start().chars().take(60).collect();
        return Err(Failure::Fatal(format!(
            "HTTP 200 with a body that is not JSON ({start:?}); check --endpoint"
        )));
    };
    v["choices"][0]["message"]["content"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| Failure::GaveUp("a completion without choices[0].message.content".into()))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 9110's two forms, clamped; everything else is no `Retry-After` at all.
    #[test]
    fn retry_after_reads_seconds_or_a_date_and_clamps() {
        let now = httpdate::parse_http_date("Wed, 02 Dec 2026 12:00:00 GMT").unwrap();
        let max = Duration::from_secs(60);
        let at = |v: &str| retry_after(v, now, max);
        assert_eq!(at("7"), Some(Duration::from_secs(7)));
        assert_eq!(at(" 0 "), Some(Duration::ZERO));
        assert_eq!(at("100000000"), Some(max), "clamped");
        assert_eq!(
            at("99999999999999999999999"),
            Some(max),
            "beyond u64 is still long"
        );
        assert_eq!(
            at("Wed, 02 Dec 2026 12:00:30 GMT"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            at("Wed, 02 Dec 2026 11:00:00 GMT"),
            Some(Duration::ZERO),
            "past"
        );
        assert_eq!(at("Thu, 03 Dec 2026 12:00:00 GMT"), Some(max));
        for bad in ["-5", "1.5", "inf", "NaN", "1e30", "", "soon"] {
            assert_eq!(at(bad), None, "{bad:?}");
        }
    }
}
