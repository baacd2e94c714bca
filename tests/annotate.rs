//! `ual annotate` against a mock OpenAI-compatible server on 127.0.0.1 (random port), with
//! injected faults: retries, backoff, Retry-After, timeouts, fatal 4xx, crash and resume,
//! ordering under concurrency, and a key that never leaks.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::mock::{self, Mock, Reply};

const KEY: &str = "sk-test-never-print-me-4242";

/// Serves `reply(n, instruction_number)` to the n-th request (0-based).
fn serve(reply: impl Fn(usize, usize) -> Reply + Send + Sync + 'static) -> Mock {
    serve_with_prompt(move |n, item, _| reply(n, item))
}

/// Serves `reply(n, instruction_number, first_message)` to the n-th request (0-based).
fn serve_with_prompt(reply: impl Fn(usize, usize, &str) -> Reply + Send + Sync + 'static) -> Mock {
    mock::serve(move |n, body| {
        let prompt = body["messages"][0]["content"].as_str().unwrap_or_default();
        let item: usize = prompt
            .split("item ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        reply(n, item, prompt)
    })
}

/// `n` Alpaca lines; line i asks about "item i".
fn input(dir: &Path, n: usize) -> PathBuf {
    let path = dir.join("in.jsonl");
    let text: String = (0..n)
        .map(|i| json!({"instruction": format!("Describe item {i} please."), "output": format!("Item {i}."), "id": i}).to_string() + "\n")
        .collect();
    std::fs::write(&path, text).unwrap();
    path
}

fn expected_score(item: usize) -> f64 {
    (1 + item % 10) as f64
}

fn annotate(mock: &Mock, input: &Path, output: &Path, extra: &[&str]) -> Output {
    common::ual()
        .args([
            "annotate",
            "--endpoint",
            &mock.url,
            "--model",
            "mock-judge",
            "--api-key-env",
            "UAL_TEST_KEY",
        ])
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .args(["--retry-base-ms", "20"])
        .args(extra)
        .env("UAL_TEST_KEY", KEY)
        .output()
        .unwrap()
}

fn read(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn assert_no_key(texts: &[&str]) {
    for t in texts {
        assert!(!t.contains(KEY), "the API key leaked: {t}");
    }
}

#[test]
fn concurrent_answers_keep_input_order_and_feed_training() {
    let mock = serve(|n, item| {
        Reply::Slow(
            Duration::from_millis((n * 7 % 5) as u64),
            expected_score(item).to_string(),
        )
    });
    let tmp = tempfile::tempdir().unwrap();
    let (input, output) = (input(tmp.path(), 40), tmp.path().join("out.jsonl"));
    let out = annotate(&mock, &input, &output, &["--concurrency", "8"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = read(&output);
    assert_eq!(lines.len(), 40);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["id"], i, "input order");
        assert_eq!(line["uncertainty"].as_f64().unwrap(), expected_score(i));
        assert_eq!(line["uncertainty_source"], "model:mock-judge");
        assert_eq!(
            line["output"],
            format!("Item {i}."),
            "input fields unchanged"
        );
    }
    assert_eq!(mock.requests(), 40);
    assert!(
        mock.auth
            .lock()
            .unwrap()
            .iter()
            .all(|a| a == &format!("Bearer {KEY}")),
        "the key is sent"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("40 scored, 0 failed"), "{stderr}");

    // The annotated file is training data as it is.
    let tiny = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
    let config = ual::train::TrainConfig::resolve(
        None,
        &[
            format!("model={:?}", tiny.display().to_string()),
            format!("train_data={:?}", output.display().to_string()),
            format!("output_dir={:?}", tmp.path().display().to_string()),
            "device=\"cpu\"".into(),
            "steps=1".into(),
            "batch_size=4".into(),
            "checkpoint_every=0".into(),
        ],
    )
    .unwrap();
    let mut config = config;
    config.eval_data = None;
    let summary = ual::train::run(&config, false).unwrap();
    assert_eq!(summary.data.without_uncertainty, 0);
}

#[test]
fn garbage_replies_are_followed_up_then_failed_with_a_reason() {
    // Item 1: garbage once, then a score. Item 2: garbage always.
    let calls = Arc::new(Mutex::new(std::collections::HashMap::<usize, usize>::new()));
    let seen = calls.clone();
    let mock = serve(move |_, item| {
        let mut seen = seen.lock().unwrap();
        let k = seen.entry(item).or_default();
        *k += 1;
        match (item, *k) {
            (1, 1) | (2, _) => Reply::Score("Hmm, that depends on many things.".into()),
            _ => Reply::Score(format!("Score: {}", expected_score(item))),
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let (input, output) = (input(tmp.path(), 3), tmp.path().join("out.jsonl"));
    let out = annotate(&mock, &input, &output, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = read(&output);
    assert_eq!(
        lines
            .iter()
            .map(|l| l["id"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [0, 1]
    );
    assert_eq!(lines[1]["uncertainty"].as_f64().unwrap(), 2.0);
    let failed = read(&tmp.path().join("out.jsonl.failed.jsonl"));
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["id"], 2);
    assert!(
        failed[0]["reason"]
            .as_str()
            .unwrap()
            .contains("no valid score")
    );
    let calls = calls.lock().unwrap();
    assert_eq!(
        (calls[&0], calls[&1], calls[&2]),
        (1, 2, 3),
        "one follow-up for item 1, two for item 2"
    );
    // The follow-up carries the conversation and a stricter instruction.
    let bodies = mock.bodies.lock().unwrap();
    let follow_up = bodies
        .iter()
        .find(|b| b["messages"].as_array().unwrap().len() == 3)
        .unwrap();
    assert!(
        follow_up["messages"][2]["content"]
            .as_str()
            .unwrap()
            .contains("single integer")
    );
}

#[test]
fn rate_limits_server_errors_and_timeouts_are_retried() {
    // Request 0: 429 with Retry-After 1 s; request 1: 500; request 2: too slow; then fine.
    let mock = serve(|n, item| match n {
        0 => Reply::Status(429, Some("1")),
        1 => Reply::Status(500, None),
        2 => Reply::Slow(Duration::from_secs(3), "5".into()),
        _ => Reply::Score(expected_score(item).to_string()),
    });
    let tmp = tempfile::tempdir().unwrap();
    let (input, output) = (input(tmp.path(), 1), tmp.path().join("out.jsonl"));
    let started = Instant::now();
    let out = annotate(&mock, &input, &output, &["--timeout", "0.5"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After was honoured"
    );
    assert_eq!(read(&output)[0]["uncertainty"].as_f64().unwrap(), 1.0);
    assert_eq!(mock.requests(), 4);

    // With the retries exhausted the line fails; the run completes, its files are written, and
    // since no line at all was scored it says so and exits non-zero.
    let mock = serve(|_, _| Reply::Status(503, None));
    let output = tmp.path().join("out2.jsonl");
    let out = annotate(&mock, &input, &output, &["--max-retries", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "every line failed: {stderr}");
    assert!(
        stderr.contains("no line of") && stderr.contains("was scored"),
        "{stderr}"
    );
    assert_eq!(mock.requests(), 3);
    let failed = read(&tmp.path().join("out2.jsonl.failed.jsonl"));
    assert!(
        failed[0]["reason"]
            .as_str()
            .unwrap()
            .contains("HTTP 503 after 2 retries")
    );
}

#[test]
fn a_wrong_key_stops_at_once_without_leaking_it() {
    let mock = serve(|_, _| Reply::Status(401, None));
    let tmp = tempfile::tempdir().unwrap();
    let (input, output) = (input(tmp.path(), 5), tmp.path().join("out.jsonl"));
    let out = annotate(&mock, &input, &output, &["--concurrency", "1"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("HTTP 401") && stderr.contains("--api-key-env"),
        "{stderr}"
    );
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("error:")).count(),
        1
    );
    assert_eq!(mock.requests(), 1, "401 is not retried");
    assert!(!output.exists(), "no partial output");
    let cache =
        std::fs::read_to_string(tmp.path().join("out.jsonl.cache.jsonl")).unwrap_or_default();
    assert_no_key(&[&stderr, &String::from_utf8_lossy(&out.stdout), &cache]);
}

#[test]
fn the_key_never_reaches_output_cache_or_logs() {
    let mock = serve(|n, item| {
        if n == 0 {
            Reply::Score("no idea".into())
        } else {
            Reply::Score(expected_score(item).to_string())
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let (input, output) = (input(tmp.path(), 3), tmp.path().join("out.jsonl"));
    let out = annotate(&mock, &input, &output, &[]);
    assert!(out.status.success());
    let files: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    let logs = [
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ];
    assert_no_key(
        &files
            .iter()
            .chain(&logs)
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
}

#[test]
fn a_killed_run_resumes_without_asking_twice_or_losing_lines() {
    let mock =
        serve(|_, item| Reply::Slow(Duration::from_millis(40), expected_score(item).to_string()));
    let tmp = tempfile::tempdir().unwrap();
    let (input, output) = (input(tmp.path(), 30), tmp.path().join("out.jsonl"));
    let mut child = common::ual()
        .args([
            "annotate",
            "--endpoint",
            &mock.url,
            "--model",
            "mock-judge",
            "--concurrency",
            "2",
        ])
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    while mock.requests() < 12 {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    assert!(!output.exists(), "a killed run leaves no output file");
    let cached = std::fs::read_to_string(tmp.path().join("out.jsonl.cache.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert!(
        cached >= 8,
        "answers arrived before the kill are on disk ({cached})"
    );
    let before = mock.requests();

    let out = annotate(&mock, &input, &output, &["--concurrency", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        mock.requests() - before,
        30 - cached,
        "only unanswered lines are asked again"
    );
    let lines = read(&output);
    assert_eq!(
        lines
            .iter()
            .map(|l| l["id"].as_u64().unwrap() as usize)
            .collect::<Vec<_>>(),
        (0..30).collect::<Vec<_>>()
    );
    // Every prompt was answered at most once across both runs, in-flight ones at the kill aside.
    let bodies = mock.bodies.lock().unwrap();
    let mut asked = std::collections::HashMap::<String, usize>::new();
    for b in bodies.iter() {
        *asked
            .entry(b["messages"][0]["content"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let twice = asked.values().filter(|&&n| n > 1).count();
    assert!(
        twice <= before - cached,
        "{twice} prompts asked twice, {} were in flight",
        before - cached
    );
}

#[test]
fn local_mode_scores_with_a_model_entropy() {
    let tmp = tempfile::tempdir().unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let output = tmp.path().join("out.jsonl");
    let out = common::ual()
        .args(["annotate", "--device", "cpu", "--from-model"])
        .arg(root.join("tests/fixtures/models/llama-gqa"))
        .arg("--input")
        .arg(root.join("tests/fixtures/score/data.jsonl"))
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = read(&output);
    assert_eq!(lines.len(), 4);
    for line in &lines {
        let u = line["uncertainty"].as_f64().unwrap();
        assert!((1.0..=10.0).contains(&u), "{u}");
        assert!(
            line["uncertainty_source"]
                .as_str()
                .unwrap()
                .starts_with("entropy:")
        );
    }
    assert_eq!(ual::annotate::local::entropy_score(0.0, 32000), 1.0);
    assert_eq!(
        ual::annotate::local::entropy_score((32000f64).ln(), 32000),
        10.0
    );
}

#[test]
fn paper_preset_sends_the_authors_prompt_and_reads_their_scale() {
    // Replies by line: 0 (valid on 0–99), 57 in prose that quotes a band, and 100 (off the
    // scale, every time).
    let mock = serve_with_prompt(|_, _, prompt| {
        Reply::Score(if prompt.contains("Add 2 and 2") {
            "0".to_string()
        } else if prompt.contains("poem") {
            "The dialogue is creative and casual (70-99 band).\n\nScore: 57".to_string()
        } else {
            "100".to_string()
        })
    });
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(
        &input,
        [
            json!({"conversations": ["Add 2 and 2.", "4"]}),
            json!({"conversations": [{"from": "human", "value": "Write a poem."}, {"from": "gpt", "value": "Roses."}]}),
            json!({"instruction": "Anything", "output": "Else"}),
        ]
        .iter()
        .map(|l| l.to_string() + "\n")
        .collect::<String>(),
    )
    .unwrap();
    let output = tmp.path().join("out.jsonl");
    let out = annotate(&mock, &input, &output, &["--prompt-preset", "paper"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let scored = read(&output);
    assert_eq!(scored.len(), 2, "the line scored 100 is refused");
    assert_eq!(
        scored[0]["uncertainty"].as_f64(),
        Some(0.0),
        "0 is a valid score"
    );
    assert_eq!(scored[1]["uncertainty"].as_f64(), Some(57.0));
    let failed = read(&ual::annotate::sibling(&output, "failed.jsonl"));
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["instruction"], "Anything");

    let bodies = mock.bodies.lock().unwrap();
    let first = bodies
        .iter()
        .find(|b| {
            b["messages"][0]["content"]
                .as_str()
                .unwrap()
                .contains("Add 2 and 2")
        })
        .unwrap();
    // The authors' request: one user message, temperature 0, top_p 0.9, max_tokens 4096.
    assert_eq!(first["temperature"], 0);
    assert_eq!(first["top_p"], 0.9);
    assert_eq!(first["max_tokens"], 4096);
    let prompt = first["messages"][0]["content"].as_str().unwrap();
    assert!(prompt.starts_with("Your task is to evaluate and rate the need for diversity in dialogue responses on a scale from 0 to 99."));
    assert!(
        prompt.ends_with("#### Example:\nAdd 2 and 2.\n4\n"),
        "{prompt:?}"
    );
    // A refused reply gets the follow-up, naming the preset's scale.
    let follow_up = bodies
        .iter()
        .find(|b| b["messages"].as_array().unwrap().len() > 1)
        .unwrap();
    assert!(
        follow_up["messages"][2]["content"]
            .as_str()
            .unwrap()
            .contains("from 0 to 99")
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(" 50 |"),
        "the histogram follows the 0–99 scale: {stderr}"
    );
}

/// `--from-model` renders the lines with `--template`: the authors' template gives the model
/// other context, so other entropies (alpaca is the default).
#[test]
fn local_mode_follows_the_template() {
    let tmp = tempfile::tempdir().unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let scores = |template: &str| {
        let output = tmp.path().join(format!("{template}.jsonl"));
        let out = common::ual()
            .args([
                "annotate",
                "--device",
                "cpu",
                "--template",
                template,
                "--from-model",
            ])
            .arg(root.join("tests/fixtures/models/llama-gqa"))
            .arg("--input")
            .arg(root.join("tests/fixtures/score/data.jsonl"))
            .arg("--output")
            .arg(&output)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        read(&output)
            .iter()
            .map(|l| l["uncertainty"].as_f64().unwrap())
            .collect::<Vec<_>>()
    };
    let (alpaca, vicuna) = (scores("alpaca"), scores("vicuna"));
    assert_eq!(alpaca.len(), vicuna.len());
    assert!(
        alpaca
            .iter()
            .zip(&vicuna)
            .any(|(a, v)| (a - v).abs() > 1e-6),
        "alpaca {alpaca:?} vs vicuna {vicuna:?}"
    );
}

/// A hostile server's `Retry-After` (huge, negative, non-finite, a far date) neither panics nor
/// hangs: huge values wait `--max-wait`, unreadable ones the ordinary backoff.
#[test]
fn hostile_retry_after_values_are_clamped_or_ignored() {
    let values = [
        "1e30",
        "-5",
        "NaN",
        "inf",
        "100000000",
        "Fri, 31 Dec 9999 23:59:59 GMT",
    ];
    let mock = serve(move |n, item| match values.get(n) {
        Some(v) => Reply::Status(429, Some(*v)),
        None => Reply::Score(expected_score(item).to_string()),
    });
    let tmp = tempfile::tempdir().unwrap();
    let (input, output) = (input(tmp.path(), 1), tmp.path().join("out.jsonl"));
    let started = Instant::now();
    let extra = ["--max-wait", "0.2", "--max-retries", "8"];
    let out = annotate(&mock, &input, &output, &extra);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(read(&output)[0]["uncertainty"].as_f64().unwrap(), 1.0);
    assert_eq!(mock.requests(), values.len() + 1);
}

/// An endpoint that answers 200 with a web page is the wrong URL: the run stops at once.
#[test]
fn an_html_reply_is_fatal() {
    let server = std::sync::Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
    let url = format!(
        "http://127.0.0.1:{}",
        server.server_addr().to_ip().unwrap().port()
    );
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for request in server.incoming_requests() {
            c.fetch_add(1, Ordering::SeqCst);
            let _ = request.respond(tiny_http::Response::from_string(
                "<html><body>Sign in</body></html>",
            ));
        }
    });
    let mock = Mock {
        url,
        bodies: Default::default(),
        auth: Default::default(),
    };
    let tmp = tempfile::tempdir().unwrap();
    let (input, output) = (input(tmp.path(), 5), tmp.path().join("out.jsonl"));
    let out = annotate(&mock, &input, &output, &["--concurrency", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("not JSON") && stderr.contains("--endpoint"),
        "{stderr}"
    );
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "no retry, no other line asked"
    );
    assert!(!output.exists(), "no partial output");
}

/// Lines whose cached reply held no score are asked again with --retry-failed, and only then.
#[test]
fn retry_failed_asks_again_for_failed_lines_only() {
    let fixed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = fixed.clone();
    let mock = serve(move |_, item| match (item, f.load(Ordering::SeqCst)) {
        (1, false) => Reply::Score("I cannot say.".into()),
        _ => Reply::Score(expected_score(item).to_string()),
    });
    let tmp = tempfile::tempdir().unwrap();
    let (input, output) = (input(tmp.path(), 3), tmp.path().join("out.jsonl"));
    let out = annotate(&mock, &input, &output, &["--concurrency", "1"]);
    assert!(out.status.success());
    assert_eq!(read(&output).len(), 2, "line 1 failed");
    fixed.store(true, Ordering::SeqCst);
    let asked = mock.requests();
    let out = annotate(&mock, &input, &output, &["--concurrency", "1"]);
    assert!(out.status.success());
    assert_eq!(
        mock.requests(),
        asked,
        "a plain re-run takes the cached failure"
    );
    let out = annotate(
        &mock,
        &input,
        &output,
        &["--concurrency", "1", "--retry-failed"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        mock.requests(),
        asked + 1,
        "only the failed line is asked again"
    );
    assert_eq!(read(&output).len(), 3);
}

/// A reply whose headers come but whose body stalls is a timeout, retried like one, not a
/// "malformed" reply.
#[test]
fn a_stalled_body_is_a_timeout_and_is_retried() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let mut stream = stream.unwrap();
            // One thread per connection, so the stalled one holds up no other.
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                let _ = stream.read(&mut buf);
                if n == 0 {
                    let head = b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{\"choices\"";
                    let _ = stream.write_all(head);
                    std::thread::sleep(Duration::from_secs(3));
                    return;
                }
                let body = json!({"choices": [{"message": {"role": "assistant", "content": "3"}}]})
                    .to_string();
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(body.as_bytes());
            });
        }
    });
    let mock = Mock {
        url,
        bodies: Default::default(),
        auth: Default::default(),
    };
    let tmp = tempfile::tempdir().unwrap();
    let (input, output) = (input(tmp.path(), 1), tmp.path().join("out.jsonl"));
    let extra = ["--timeout", "0.5", "--concurrency", "1"];
    let out = annotate(&mock, &input, &output, &extra);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(read(&output)[0]["uncertainty"].as_f64().unwrap(), 3.0);
}

/// What cannot be meant stops before any request, in one line: a URL that is not http(s)
/// (once retried for 39 s), no request at a time, an output that is the input itself.
#[test]
fn settings_that_cannot_be_meant_are_refused_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, "{\"instruction\":\"Hi\",\"output\":\"Hello\"}\n").unwrap();
    let output = tmp.path().join("out.jsonl");
    let run = |endpoint: &str, output: &Path, extra: &[&str]| {
        let started = std::time::Instant::now();
        let out = common::ual()
            .args(["annotate", "--endpoint", endpoint, "--model", "m"])
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(output)
            .args(extra)
            .output()
            .unwrap();
        assert!(
            started.elapsed().as_secs() < 10,
            "{endpoint}: refused at once"
        );
        assert!(!out.status.success(), "{endpoint} {extra:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    for bad in ["not a url", "ftp://example.com/v1", "http://"] {
        let stderr = run(bad, &output, &[]);
        assert!(
            stderr.contains("--endpoint") && stderr.contains("http"),
            "{bad}: {stderr}"
        );
    }
    let stderr = run("http://127.0.0.1:9", &output, &["--concurrency", "0"]);
    assert!(stderr.contains("concurrency"), "{stderr}");
    let stderr = run("http://127.0.0.1:9", &input, &[]);
    assert!(stderr.contains("--input itself"), "{stderr}");
    assert!(
        std::fs::read_to_string(&input).unwrap().contains("Hello"),
        "the input is untouched"
    );
}
