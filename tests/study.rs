//! `ual study` on a 2-arm, 1-seed, few-step configuration: it finishes, its report's numbers
//! are results.json's, a finished run is not rerun, a killed study resumes to the same
//! results, and changed settings are refused.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

mod common;
use common::mock::{self, Reply};
use common::ok;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The first `n` lines of a bundled study file, copied into `dir`.
fn head(dir: &Path, name: &str, n: usize) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("studies/data/mixed-tiny").join(name)).unwrap();
    let path = dir.join(name);
    let lines: String = text.lines().take(n).map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, lines).unwrap();
    path
}

/// A small study in `dir` writing into `out`.
fn config(dir: &Path, out: &Path) -> PathBuf {
    config_with(dir, out, "")
}

/// A small study with `extra` TOML appended.
fn config_with(dir: &Path, out: &Path, extra: &str) -> PathBuf {
    let (train, low, high) = (
        head(dir, "train.jsonl", 48),
        head(dir, "low.jsonl", 6),
        head(dir, "high.jsonl", 2),
    );
    let text = format!(
        r#"name = "small"
output_dir = {out:?}
arms = ["sft", "ual"]
seeds = [5]

[train]
model = {model:?}
train_data = {train:?}
eval_data = {low:?}
device = "cpu"
steps = 6
batch_size = 4
max_seq_len = 96
eval_every = 3
checkpoint_every = 2

[eval]
low_entropy = {low:?}
high_entropy = {high:?}
max_new_tokens = 12
samples = 2
{extra}"#,
        model = repo().join("models/tiny"),
    );
    let path = dir.join("study.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn study(config: &Path) -> Command {
    let mut command = common::ual();
    command.arg("study").arg("--config").arg(config);
    command
}

fn read_results(out: &Path) -> Value {
    let path = out.join("small/results.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn a_study_finishes_and_its_report_says_what_results_json_says() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let config = config(tmp.path(), &out);
    ok(&study(&config).output().unwrap());
    let results = read_results(&out);
    assert_eq!(results["runs"].as_array().unwrap().len(), 2);
    let report = std::fs::read_to_string(out.join("small/REPORT.md")).unwrap();
    // Every cell of the table is the results' mean at four decimals (one seed: no ±).
    for metric in results["metrics"].as_array().unwrap() {
        let title = metric["title"].as_str().unwrap();
        let row = report
            .lines()
            .find(|l| l.starts_with(&format!("| {title} |")))
            .unwrap_or_else(|| panic!("no row for {title}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        for (i, arm) in metric["arms"].as_array().unwrap().iter().enumerate() {
            let want = match arm["spread"]["mean"].as_f64() {
                _ if metric["key"] == "judged_win_rate" && arm["arm"] == "sft" => "baseline".into(),
                Some(mean) => format!("{mean:.4}"),
                None if metric["key"] == "judged_win_rate" => "not judged".into(),
                None => "not measured".into(),
            };
            assert_eq!(cells[3 + i], want, "{title}, {}", arm["arm"]);
        }
        let ual = &metric["arms"][1];
        if let Some(diff) = ual["vs_sft"]["mean"].as_f64() {
            assert_eq!(cells[5], format!("{diff:.4}"), "{title}: ual − sft");
        }
    }
    assert!(
        report.contains("**not judged**"),
        "no endpoint: not judged, never a number"
    );
    assert!(report.contains("with one seed there is no spread"));
    let accuracy = &results["runs"][0]["metrics"]["low_accuracy"];
    assert!((0.0..=1.0).contains(&accuracy.as_f64().unwrap()));
    for file in ["loss.svg", "accuracy.svg", "origin.json", "study.toml"] {
        assert!(out.join("small").join(file).exists(), "{file}");
    }
    for run in ["sft-seed5", "ual-seed5"] {
        let dir = out.join("small/runs").join(run);
        for file in [
            "adapter/adapter_model.safetensors",
            "high-answers.jsonl",
            "study-metrics.json",
        ] {
            assert!(dir.join(file).exists(), "{run}/{file}");
        }
    }

    // A second invocation reruns nothing: no run's files change.
    let summary = out.join("small/runs/ual-seed5/summary.json");
    let stamp = std::fs::metadata(&summary).unwrap().modified().unwrap();
    let measured = std::fs::read(out.join("small/runs/ual-seed5/study-metrics.json")).unwrap();
    ok(&study(&config).output().unwrap());
    assert_eq!(
        std::fs::metadata(&summary).unwrap().modified().unwrap(),
        stamp
    );
    assert_eq!(
        std::fs::read(out.join("small/runs/ual-seed5/study-metrics.json")).unwrap(),
        measured
    );
    // The measures come back from study-metrics.json: serde_json's parser may move the last
    // bit of a float, so they agree to 1e-12 (relative).
    assert_close(&read_results(&out)["metrics"], &results["metrics"], 1e-12);

    // Settings are fixed once a study has begun.
    let changed = std::fs::read_to_string(&config)
        .unwrap()
        .replace("steps = 6", "steps = 7");
    std::fs::write(&config, changed).unwrap();
    let refused = study(&config).output().unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("other settings"), "{stderr}");
}

/// `a` and `b` have the same shape and strings, and numbers within `rel` of each other.
fn assert_close(a: &Value, b: &Value, rel: f64) {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!((x - y).abs() <= rel * x.abs().max(1.0), "{x} vs {y}");
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).for_each(|(x, y)| assert_close(x, y, rel));
        }
        (Value::Object(x), Value::Object(y)) => {
            assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
            x.iter().for_each(|(k, v)| assert_close(v, &y[k], rel));
        }
        _ => assert_eq!(a, b),
    }
}

#[test]
fn a_killed_study_resumes_to_the_same_results() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    ok(&study(&config(tmp.path(), &whole)).output().unwrap());

    let cut = tmp.path().join("cut");
    let config = config(tmp.path(), &cut);
    let mut child = study(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once the second arm has a checkpoint: the first arm is finished and measured,
    // the second is cut mid-training.
    let checkpoint = cut.join("small/runs/ual-seed5/checkpoint/state.json");
    let started = std::time::Instant::now();
    while !checkpoint.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!cut.join("small/results.json").exists());
    ok(&study(&config).output().unwrap());

    let (a, b) = (read_results(&whole), read_results(&cut));
    // Resumed training reproduces the uninterrupted losses and the measures are deterministic;
    // 1e-9 leaves room only for a float's last bit through study-metrics.json.
    assert_close(&a["runs"], &b["runs"], 1e-9);
    assert_close(&a["metrics"], &b["metrics"], 1e-9);
}

#[test]
fn a_judged_study_reports_the_judges_preference() {
    // A judge that always prefers the second answer shown: every order swap disagrees, so
    // every prompt is a tie and UAL's preference over SFT is exactly one half.
    let judge = mock::serve(|_, _| Reply::Score("### Judgment:\n3".into()));
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let extra = format!(
        "\n[judge]\nendpoint = {:?}\nmodel = \"mock-judge\"\nconcurrency = 2\n",
        judge.url
    );
    ok(&study(&config_with(tmp.path(), &out, &extra))
        .output()
        .unwrap());
    assert_eq!(
        judge.requests(),
        2 * 2,
        "two high-entropy prompts, both orders, ual vs sft"
    );
    let results = read_results(&out);
    let ual = &results["runs"][1];
    assert_eq!(ual["arm"], "ual");
    assert_eq!(ual["judged_win_rate"].as_f64(), Some(0.5));
    let summary = out.join("small/judge/ual-seed5/summary.json");
    assert!(summary.exists());
    let report = std::fs::read_to_string(out.join("small/REPORT.md")).unwrap();
    let row = report
        .lines()
        .find(|l| l.starts_with("| judged win rate"))
        .unwrap();
    assert!(row.contains("0.5000"), "{row}");
    assert!(!report.contains("**not judged**"));
}
