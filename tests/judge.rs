//! `ual eval judge` against a mock judge on 127.0.0.1 (random port): the order swap against a
//! position-biased judge, a real preference, garbage replies and their follow-ups, 429 and 500,
//! a SIGKILL mid-run and a resume that asks nothing twice.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

mod common;
use common::mock::{self, Mock, Reply};
use common::ok;

/// Two answer files of `n` prompts: `a` answers at length `a_len` words, `b` at `b_len`.
fn answers(dir: &Path, n: usize, a_len: usize, b_len: usize) -> (PathBuf, PathBuf) {
    let write = |name: &str, len: usize| {
        let path = dir.join(name);
        let text: String = (0..n)
            .map(|i| {
                let generation = vec![format!("word{i}"); len].join(" ");
                json!({"index": i, "instruction": format!("Question {i}?"), "generation": generation})
                    .to_string()
                    + "\n"
            })
            .collect();
        std::fs::write(&path, text).unwrap();
        path
    };
    (write("a.jsonl", a_len), write("b.jsonl", b_len))
}

/// The two answers a judge prompt shows, first and second (the authors' headings).
fn shown(body: &Value) -> (String, String) {
    let prompt = body["messages"][0]["content"].as_str().unwrap();
    let first = prompt.split("### First answer:\n").nth(1).unwrap();
    let (first, second) = first.split_once("\n\n### Second answer:\n").unwrap();
    (first.to_string(), second.trim_end().to_string())
}

/// The authors' reply format around a verdict digit.
fn verdict(digit: u8) -> String {
    format!(
        "### Rationale:\nBoth answers were read; 1. is weighed against 2.\n\n### Judgment:\n**{digit}**"
    )
}

/// A judge that prefers the longer answer, in either position.
fn prefers_longer(body: &Value) -> String {
    let (first, second) = shown(body);
    verdict(match first.len().cmp(&second.len()) {
        std::cmp::Ordering::Greater => 1,
        std::cmp::Ordering::Equal => 2,
        std::cmp::Ordering::Less => 3,
    })
}

fn judge(mock: &Mock, a: &Path, b: &Path, out: &Path, extra: &[&str]) -> Output {
    judge_command(mock, a, b, out, extra).output().unwrap()
}

fn judge_command(mock: &Mock, a: &Path, b: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut command = common::ual();
    command
        .args([
            "eval",
            "judge",
            "--endpoint",
            &mock.url,
            "--model",
            "mock-judge",
        ])
        .arg("--a")
        .arg(a)
        .arg("--b")
        .arg(b)
        .arg("--output")
        .arg(out)
        .args(["--retry-base-ms", "10"])
        .args(extra);
    command
}

fn summary(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
}

fn judgments(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("judgments.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_judge_biased_to_the_first_position_prefers_neither_answer() {
    let mock = mock::serve(|_, _| Reply::Score(verdict(1)));
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = answers(tmp.path(), 6, 5, 2);
    let out = tmp.path().join("judge");
    ok(&judge(&mock, &a, &b, &out, &[]));
    let s = summary(&out);
    assert_eq!(
        (s["wins"].as_u64(), s["ties"].as_u64(), s["losses"].as_u64()),
        (Some(0), Some(6), Some(0))
    );
    assert_eq!(s["rates"]["preference"]["value"].as_f64(), Some(0.5));
    assert_eq!(mock.requests(), 12, "each prompt is asked in both orders");
    // Each prompt went once with a first and once with b first.
    let bodies = mock.bodies.lock().unwrap();
    let firsts: Vec<String> = bodies.iter().map(|b| shown(b).0).collect();
    assert_eq!(
        firsts.iter().filter(|f| f.split(' ').count() == 5).count(),
        6
    );
    assert!(out.join("winrate.svg").exists());
}

#[test]
fn a_real_preference_survives_the_swap_and_gets_an_interval() {
    let mock = mock::serve(|_, body| Reply::Score(prefers_longer(body)));
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = answers(tmp.path(), 8, 6, 3);
    let out = tmp.path().join("judge");
    ok(&judge(&mock, &a, &b, &out, &[]));
    let s = summary(&out);
    assert_eq!(s["wins"].as_u64(), Some(8));
    let win = &s["rates"]["win"];
    assert_eq!(win["value"].as_f64(), Some(1.0));
    assert_eq!(win["ci95"], json!([1.0, 1.0]), "unanimous: no spread");
    for j in judgments(&out) {
        assert_eq!(j["a_first"], "first");
        assert_eq!(j["b_first"], "second");
        assert_eq!(j["outcome"], "win");
        assert!(j["a_first_reply"].as_str().unwrap().contains("Judgment"));
    }
    // The same comparison the other way round is all losses.
    let out2 = tmp.path().join("judge-reversed");
    ok(&judge(&mock, &b, &a, &out2, &[]));
    assert_eq!(summary(&out2)["losses"].as_u64(), Some(8));
}

#[test]
fn garbage_429_and_500_are_retried_or_followed_up() {
    // Request 0 gets 429 (Retry-After 0), request 1 a 500; every first turn without a
    // follow-up is garbage, every follow-up gets the verdict.
    let mock = mock::serve(|n, body| match n {
        0 => Reply::Status(429, Some("0")),
        1 => Reply::Status(500, None),
        _ if body["messages"].as_array().unwrap().len() == 1 => {
            Reply::Score("I cannot decide between these two.".into())
        }
        _ => Reply::Score("3".into()),
    });
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = answers(tmp.path(), 4, 3, 3);
    let out = tmp.path().join("judge");
    ok(&judge(&mock, &a, &b, &out, &["--concurrency", "1"]));
    let s = summary(&out);
    // "3" in both orders: a loses when shown first, wins when shown second: a tie.
    assert_eq!(
        (
            s["judged"].as_u64(),
            s["ties"].as_u64(),
            s["failed"].as_u64()
        ),
        (Some(4), Some(4), Some(0))
    );
    let bodies = mock.bodies.lock().unwrap();
    let follow_ups = bodies
        .iter()
        .filter(|b| b["messages"].as_array().unwrap().len() == 3)
        .count();
    assert_eq!(follow_ups, 8, "one follow-up per order");
    // The follow-up quotes the garbage back and asks for the digit alone.
    let last = bodies.last().unwrap()["messages"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(last[1]["content"], "I cannot decide between these two.");
    assert!(
        last[2]["content"]
            .as_str()
            .unwrap()
            .contains("single digit")
    );
}

#[test]
fn a_judge_that_never_gives_a_verdict_fails_every_prompt_clearly() {
    let mock = mock::serve(|_, _| Reply::Score("Both are lovely.".into()));
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = answers(tmp.path(), 2, 3, 3);
    let out = tmp.path().join("judge");
    let run = judge(&mock, &a, &b, &out, &[]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("no prompt was judged"), "{stderr}");
    assert_eq!(summary(&out)["failed"].as_u64(), Some(2));
    for j in judgments(&out) {
        assert!(j["outcome"].is_null());
        assert_eq!(j["a_first_reply"], "Both are lovely.");
    }
    // Two orders × (one ask + two follow-ups).
    assert_eq!(mock.requests(), 2 * 2 * 3);
}

#[test]
fn a_killed_run_resumes_without_asking_twice() {
    let mock = mock::serve(|_, body| Reply::Slow(Duration::from_millis(60), prefers_longer(body)));
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = answers(tmp.path(), 12, 4, 2);
    let out = tmp.path().join("judge");
    let mut child = judge_command(&mock, &a, &b, &out, &["--concurrency", "2"])
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    while mock.requests() < 10 {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !out.join("summary.json").exists(),
        "a killed run writes no summary"
    );
    let cached = std::fs::read_to_string(out.join("judge.cache.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert!(
        cached >= 6,
        "answers before the kill are on disk ({cached})"
    );
    let before = mock.requests();
    ok(&judge(&mock, &a, &b, &out, &["--concurrency", "2"]));
    assert_eq!(
        mock.requests() - before,
        24 - cached,
        "only unanswered orders are asked"
    );
    let s = summary(&out);
    assert_eq!(
        (s["wins"].as_u64(), s["cached"].as_u64()),
        (Some(12), Some(cached as u64))
    );
    // A third run asks nothing at all.
    let before = mock.requests();
    ok(&judge(&mock, &a, &b, &out, &[]));
    assert_eq!(mock.requests(), before);
}

#[test]
fn answers_compare_with_references_and_mismatched_sets_are_refused() {
    let mock = mock::serve(|_, body| Reply::Score(prefers_longer(body)));
    let tmp = tempfile::tempdir().unwrap();
    let (a, _) = answers(tmp.path(), 3, 1, 1);
    // References in the training schema: longer than the one-word answers.
    let references = tmp.path().join("refs.jsonl");
    let text: String = (0..3)
        .map(|i| json!({"instruction": format!("Question {i}?"), "output": "a much longer reference answer"}).to_string() + "\n")
        .collect();
    std::fs::write(&references, text).unwrap();
    let out = tmp.path().join("judge");
    ok(&judge(&mock, &a, &references, &out, &[]));
    assert_eq!(summary(&out)["losses"].as_u64(), Some(3));

    let short = tmp.path().join("short.jsonl");
    std::fs::write(
        &short,
        "{\"instruction\": \"Question 0?\", \"generation\": \"x\"}\n",
    )
    .unwrap();
    let run = judge(&mock, &a, &short, &tmp.path().join("j2"), &[]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("has 3 answers") && stderr.contains("has 1"),
        "{stderr}"
    );

    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"instruction\": \"Q\", \"generation\": 5}\n").unwrap();
    let run = judge(&mock, &bad, &bad, &tmp.path().join("j3"), &[]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("bad.jsonl:1") && stderr.contains("`generation`"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// A judge that answers every request with HTTP 500: the error names the cause (it once said
/// only "no prompt was judged", pointing at a file of empty replies), and every judgment line
/// records why its orders got no verdict.
#[test]
fn a_judge_that_fails_every_request_says_why() {
    let mock = mock::serve(|_, _| Reply::Status(500, None));
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = answers(tmp.path(), 2, 3, 3);
    let out = tmp.path().join("judge");
    let run = judge(&mock, &a, &b, &out, &["--max-retries", "0"]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("no prompt was judged") && stderr.contains("500"),
        "{stderr}"
    );
    for j in judgments(&out) {
        let failures = j["failures"].as_array().unwrap();
        assert_eq!(failures.len(), 2, "{j}");
        assert!(failures[0].as_str().unwrap().contains("500"), "{j}");
    }
    assert!(
        summary(&out)["failure_reasons"][0][0]
            .as_str()
            .unwrap()
            .contains("500")
    );
}

/// Two empty answer files judge nothing: refused, as the other evaluations refuse empty input
/// (it once printed "NaN% [NaN, NaN]" and exited 0).
#[test]
fn empty_answer_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a.jsonl"), tmp.path().join("b.jsonl"));
    std::fs::write(&a, "").unwrap();
    std::fs::write(&b, "").unwrap();
    let mock = mock::serve(|_, _| Reply::Score("Judgment: 1".into()));
    let run = judge(&mock, &a, &b, &tmp.path().join("judge"), &[]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        !run.status.success() && stderr.contains("no answers"),
        "{stderr}"
    );
    assert!(!stderr.contains("NaN"), "{stderr}");
}
