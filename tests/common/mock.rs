//! A mock OpenAI-compatible chat server on 127.0.0.1 (random port) with injected faults, for
//! `annotate` and `eval judge`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

/// What the server answers one request with.
pub enum Reply {
    /// 200 with this assistant message.
    Score(String),
    /// This status, with an optional `Retry-After`.
    Status(u16, Option<&'static str>),
    /// 200 with this message, after a delay.
    Slow(Duration, String),
}

/// A running server.
pub struct Mock {
    /// Its base URL.
    pub url: String,
    /// Every request body received, in arrival order.
    pub bodies: Arc<Mutex<Vec<Value>>>,
    /// Every request's Authorization header (empty when absent).
    pub auth: Arc<Mutex<Vec<String>>>,
}

impl Mock {
    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.bodies.lock().unwrap().len()
    }
}

/// Serves `reply(n, body)` to the n-th request (0-based), each on its own thread.
pub fn serve(reply: impl Fn(usize, &Value) -> Reply + Send + Sync + 'static) -> Mock {
    let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
    let url = format!(
        "http://127.0.0.1:{}",
        server.server_addr().to_ip().unwrap().port()
    );
    let (bodies, auth) = (
        Arc::new(Mutex::new(Vec::new())),
        Arc::new(Mutex::new(Vec::new())),
    );
    let (b, a, reply) = (bodies.clone(), auth.clone(), Arc::new(reply));
    let count = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for mut request in server.incoming_requests() {
            let (b, a, reply, count) = (b.clone(), a.clone(), reply.clone(), count.clone());
            std::thread::spawn(move || {
                let mut text = String::new();
                request.as_reader().read_to_string(&mut text).unwrap();
                let body: Value = serde_json::from_str(&text).unwrap();
                let header = request
                    .headers()
                    .iter()
                    .find(|h| h.field.equiv("Authorization"));
                a.lock()
                    .unwrap()
                    .push(header.map(|h| h.value.to_string()).unwrap_or_default());
                b.lock().unwrap().push(body.clone());
                let n = count.fetch_add(1, Ordering::SeqCst);
                let completion = |content: String| {
                    json!({"choices": [{"message": {"role": "assistant", "content": content}}]})
                        .to_string()
                };
                let response = match reply(n, &body) {
                    Reply::Score(content) => tiny_http::Response::from_string(completion(content)),
                    Reply::Slow(delay, content) => {
                        std::thread::sleep(delay);
                        tiny_http::Response::from_string(completion(content))
                    }
                    Reply::Status(code, retry_after) => {
                        let mut r = tiny_http::Response::from_string(
                            r#"{"error":{"message":"mock says no"}}"#,
                        )
                        .with_status_code(code);
                        if let Some(seconds) = retry_after {
                            r.add_header(
                                tiny_http::Header::from_bytes("Retry-After", seconds).unwrap(),
                            );
                        }
                        r
                    }
                };
                let _ = request.respond(response);
            });
        }
    });
    Mock { url, bodies, auth }
}
