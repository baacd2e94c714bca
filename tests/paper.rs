//! The authors' recipe, checked against a fresh Python port of their code
//! (`scripts/make_paper_recipe_fixtures.py`, `scripts/make_clustering_fixture.py`): the
//! mapping, the loss under their conventions and ual's, the clustering analysis, the evaluation
//! protocols, and the shipped configs training end to end.

mod common;

use std::path::{Path, PathBuf};

use common::{devices, fixture_model, fixtures};
use serde::Deserialize;
use serde_json::Value;
use ual::data::template::Template;
use ual::eval::clustering::analyse;
use ual::eval::score::score_file;
use ual::model::Pretrained;
use ual::train::TrainConfig;
use ual::uncertainty::mean_normalised;

/// Per-line losses: f32 compute (f16 weights) against the port's float64 (the issue's 2e-4).
const LOSS_RTOL: f64 = 2e-4;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[derive(Deserialize)]
struct Expected {
    paper: Vec<Line>,
    all_response: Vec<Line>,
}

#[derive(Deserialize)]
struct Line {
    ids: Vec<u32>,
    loss_mask: Vec<bool>,
    epsilon: f64,
    nll: f64,
    loss: f64,
}

fn expected() -> Expected {
    let text = std::fs::read_to_string(fixtures().join("paper/expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn recipe(overrides: &[&str]) -> TrainConfig {
    let overrides: Vec<String> = ["model=\"unused\"", "train_data=\"unused\""]
        .iter()
        .chain(overrides)
        .map(|s| s.to_string())
        .collect();
    TrainConfig::resolve(
        Some(&root().join("configs/ual-paper-mistral-7b.toml")),
        &overrides,
    )
    .unwrap()
}

fn check_against_port(name: &str, config: &TrainConfig, want: &[Line]) {
    let data = fixtures().join("paper/data.jsonl");
    for (device_name, device) in devices() {
        let p = Pretrained::load(&fixture_model("mistral-f16"), &device).unwrap();
        let mut got = Vec::new();
        let template = Template::load(config.template, &p.dir).unwrap();
        score_file(&p, config, &template, &data, |line| {
            got.push(line);
            Ok(())
        })
        .unwrap();
        assert_eq!(got.len(), want.len(), "{name}: lines");
        for (i, (ours, port)) in got.iter().zip(want).enumerate() {
            assert_eq!(ours.index, i);
            assert_eq!(ours.ids, port.ids, "{name} line {i}: token ids");
            assert_eq!(ours.loss_mask, port.loss_mask, "{name} line {i}: loss mask");
            assert!(
                (ours.epsilon - port.epsilon).abs() < 1e-9,
                "{name} line {i}: ε {} vs {}",
                ours.epsilon,
                port.epsilon
            );
            for (what, a, b) in [("nll", ours.nll, port.nll), ("loss", ours.loss, port.loss)] {
                assert!(
                    (a - b).abs() <= LOSS_RTOL * b.abs(),
                    "{name} {device_name} line {i} {what}: ours {a}, port {b}"
                );
            }
        }
    }
}

#[test]
fn the_paper_recipe_scores_as_the_port_of_their_code() {
    check_against_port("paper", &recipe(&[]), &expected().paper);
}

#[test]
fn spread_over_all_with_response_loss_scores_as_the_port() {
    let config = recipe(&[
        "smoothing.spread=\"all\"",
        "loss_on=\"response\"",
        "max_seq_len=48",
    ]);
    check_against_port("all_response", &config, &expected().all_response);
}

#[test]
fn the_conventions_change_the_loss() {
    // The fixture must tell the conventions apart, or the two tests above prove nothing.
    let e = expected();
    for (a, b) in e.paper.iter().zip(&e.all_response) {
        assert!((a.loss - b.loss).abs() > 1e-3 || a.ids != b.ids);
    }
    assert!(e.paper.iter().any(|l| l.epsilon == 0.0), "a score of 0");
    assert!(e.paper.iter().all(|l| l.loss_mask[1..].iter().all(|&m| m)));
}

#[test]
fn mean_normalised_mapping_equals_make_score_dist() {
    #[derive(Deserialize)]
    struct Case {
        scores: Vec<f64>,
        target_mean: f64,
        cap: f64,
        epsilons: Vec<f64>,
        capped: usize,
    }
    let text = std::fs::read_to_string(fixtures().join("paper/mapping.json")).unwrap();
    let cases: Vec<Case> = serde_json::from_str(&text).unwrap();
    assert!(cases.iter().any(|c| c.capped > 0), "some case hits the cap");
    for case in &cases {
        let ours = mean_normalised(&case.scores, case.target_mean, case.cap).unwrap();
        for (i, (a, b)) in ours.iter().zip(&case.epsilons).enumerate() {
            // The same float64 loop; only numpy's summation order differs.
            assert!(
                (a - b).abs() < 1e-9,
                "scores {:?} sample {i}: {a} vs {b}",
                case.scores
            );
        }
    }
}

#[test]
fn clustering_equals_sklearn_pca_and_silhouette() {
    #[derive(Deserialize)]
    struct Fixture {
        labels: Vec<u32>,
        features: Vec<Vec<f64>>,
        top: Vec<Top>,
        pairs: Vec<Pair>,
        mean: f64,
    }
    #[derive(Deserialize)]
    struct Top {
        id: u32,
        count: usize,
    }
    #[derive(Deserialize)]
    struct Pair {
        a: u32,
        b: u32,
        silhouette: Option<f64>,
    }
    let text = std::fs::read_to_string(fixtures().join("paper/clustering.json")).unwrap();
    let f: Fixture = serde_json::from_str(&text).unwrap();
    let points: Vec<Vec<f32>> = f
        .features
        .iter()
        .map(|r| r.iter().map(|&v| v as f32).collect())
        .collect();
    let ours = analyse("fixture", &points, &f.labels, 42);
    let ids: Vec<(u32, usize)> = ours.labels.iter().map(|l| (l.id, l.count)).collect();
    let want: Vec<(u32, usize)> = f.top.iter().map(|t| (t.id, t.count)).collect();
    assert_eq!(ids, want, "the 42 labels and their order");
    assert_eq!(ours.pairs.len(), 861);
    // 1e-4 per pair and on the mean (features are read as f32: ~1e-7 of input noise).
    let mut worst = 0f64;
    for (a, b) in ours.pairs.iter().zip(&f.pairs) {
        assert_eq!((a.a, a.b), (b.a, b.b));
        let (x, y) = (a.silhouette.unwrap(), b.silhouette.unwrap());
        worst = worst.max((x - y).abs());
    }
    eprintln!("clustering: worst pair gap {worst:.2e}");
    assert!(worst <= 1e-4, "worst pair differs by {worst:.2e}");
    assert!(
        (ours.mean - f.mean).abs() <= 1e-4,
        "{} vs {}",
        ours.mean,
        f.mean
    );
}

#[test]
fn metamath_and_gsm8k_golds_are_the_authors() {
    let items = ual::eval::paper::read_metamath(&fixtures().join("paper/metamath.jsonl")).unwrap();
    let golds: Vec<&str> = items.iter().map(|i| i.gold.as_str()).collect();
    assert_eq!(golds, ["7", "\\frac{3}{4}", "7"]);
    let gsm = ual::eval::paper::read_gsm8k(&root().join("data/gsm8k/test.jsonl")).unwrap();
    assert!(
        gsm.iter()
            .all(|i| !i.gold.is_empty() && !i.gold.contains("####"))
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"query\": \"q\", \"response\": \"The answer is: 1\"}\n{\"query\": \"q\"}\n",
    )
    .unwrap();
    let err = format!("{:#}", ual::eval::paper::read_metamath(&bad).unwrap_err());
    assert!(
        err.contains("bad.jsonl:2") && err.contains("`response`"),
        "{err}"
    );
}

#[test]
fn the_paper_protocol_is_reproducible_by_seed() {
    let p = Pretrained::load(&root().join("models/tiny"), &burn::tensor::Device::flex()).unwrap();
    let mut items = ual::eval::paper::read_gsm8k(&root().join("data/gsm8k/test.jsonl")).unwrap();
    items.truncate(3);
    let run = |seed, batch| ual::eval::paper::evaluate(&p, &items, seed, batch, "gsm8k").unwrap();
    let (a, b, c) = (run(7, 1), run(7, 3), run(8, 3));
    let outputs = |r: &ual::eval::paper::Report| -> Vec<String> {
        r.graded.items.iter().map(|i| i.output.clone()).collect()
    };
    assert_eq!(
        outputs(&a),
        outputs(&b),
        "the same seed gives the same outputs, one at a time or three together"
    );
    assert_ne!(outputs(&a), outputs(&c), "another seed samples otherwise");
    for item in &a.graded.items {
        assert_eq!(item.correct, item.output.contains(&item.gold));
    }
}

/// `ual train` with a shipped config on the bundled tiny model, steps shortened.
fn train_recipe(config: &str, dir: &Path, extra: &[&str]) -> Value {
    let out = common::ual()
        .args(["train", "--config", config])
        .args(["--set", "model=\"models/tiny\""])
        .args(["--set", "train_data=\"tests/fixtures/paper/data.jsonl\""])
        .args([
            "--set",
            "epochs=0",
            "--set",
            "steps=2",
            "--set",
            "grad_accum=4",
        ])
        .args([
            "--set",
            &format!("output_dir={:?}", dir.display().to_string()),
        ])
        .args(["--device", "cpu"])
        .args(extra.iter().flat_map(|e| ["--set", e]))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{config} {extra:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn both_shipped_configs_and_their_baselines_train_end_to_end() {
    for config in [
        "configs/ual-paper-llama2-7b.toml",
        "configs/ual-paper-mistral-7b.toml",
    ] {
        // A directory per config: its three runs are named by their loss.
        let dir = tempfile::tempdir().unwrap();
        let mut losses = Vec::new();
        for (loss, name) in [("ual", "u"), ("sft", "s"), ("ls", "l")] {
            let set_loss = format!("smoothing.loss=\"{loss}\"");
            let set_name = format!("name=\"{name}\"");
            let summary = train_recipe(config, dir.path(), &[&set_loss, &set_name]);
            assert_eq!(summary["steps"], 2);
            let run = PathBuf::from(summary["run_dir"].as_str().unwrap());
            let adapter: Value = serde_json::from_str(
                &std::fs::read_to_string(run.join("adapter/adapter_config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(adapter["r"], 8);
            assert_eq!(adapter["lora_alpha"], 16.0);
            let mut targets: Vec<&str> = adapter["target_modules"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap())
                .collect();
            targets.sort();
            assert_eq!(targets, ["q_proj", "v_proj"]);
            let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
            let first: Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
            let mean_eps = first["mean_eps"].as_f64().unwrap();
            match loss {
                "sft" => assert_eq!(mean_eps, 0.0),
                "ls" => assert!((mean_eps - 0.1).abs() < 1e-9),
                _ => assert!(mean_eps > 0.0 && mean_eps != 0.1, "{mean_eps}"),
            }
            losses.push(summary["first_loss"].as_f64().unwrap());
        }
        assert!(
            losses[0] != losses[1] && losses[1] != losses[2],
            "{config}: the three losses differ ({losses:?})"
        );
    }
}

#[test]
fn score_with_the_mistral_config_prints_the_ports_lines() {
    // The command the issue names, end to end.
    let out = common::ual()
        .args(["score", "--model", "tests/fixtures/models/mistral-f16"])
        .args(["--data", "tests/fixtures/paper/data.jsonl"])
        // The flags given fill the file's `model` and `train_data`: no --set is needed.
        .args(["--config", "configs/ual-paper-mistral-7b.toml"])
        .args(["--device", "cpu", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = expected().paper;
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), want.len());
    for (line, port) in lines.iter().zip(&want) {
        for key in ["index", "ids", "loss_mask", "epsilon", "nll", "loss"] {
            assert!(line.get(key).is_some(), "missing {key}");
        }
        let loss = line["loss"].as_f64().unwrap();
        assert!((loss - port.loss).abs() <= LOSS_RTOL * port.loss);
    }
}

#[test]
fn features_paper_protocol_reports_every_pair_per_model() {
    let dir = tempfile::tempdir().unwrap();
    let summary = train_recipe(
        "configs/ual-paper-llama2-7b.toml",
        dir.path(),
        &["name=\"f\""],
    );
    let adapter = PathBuf::from(summary["run_dir"].as_str().unwrap()).join("adapter");
    let out = common::ual()
        .args(["analyze", "features", "--protocol", "paper", "--json"])
        .args(["--model", "models/tiny", "--device", "cpu"])
        .args(["--data", "tests/fixtures/paper/prompts.jsonl"])
        .arg("--adapter")
        .arg(&adapter)
        .args(["--plot", "2277,29901"])
        .arg("--output")
        .arg(dir.path().join("features"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "base, then the adapter");
    assert_eq!(rows[0]["model"], "base");
    for row in &rows {
        assert_eq!(row["labels"].as_array().unwrap().len(), 42);
        let pairs = row["pairs"].as_array().unwrap();
        assert_eq!(pairs.len(), 861);
        let scored: Vec<f64> = pairs
            .iter()
            .filter_map(|p| p["silhouette"].as_f64())
            .collect();
        let mean = scored.iter().sum::<f64>() / scored.len() as f64;
        assert!((row["mean"].as_f64().unwrap() - mean).abs() < 1e-12);
        assert!(scored.iter().all(|s| (-1.0..=1.0).contains(s)));
    }
    for i in 0..2 {
        let svg = dir.path().join(format!("features/pair-2277-29901-{i}.svg"));
        assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
    }
}

#[test]
fn sharegpt_files_report_bad_lines_by_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chat.jsonl");
    std::fs::write(
        &path,
        "{\"conversations\": [\"Q\", \"A\"]}\n{\"conversations\": [{\"from\": \"human\", \"value\": \"Q\"}, {\"from\": \"robot\", \"value\": \"A\"}]}\n",
    )
    .unwrap();
    let err = format!("{:#}", ual::data::formats::read_jsonl(&path).unwrap_err());
    assert!(
        err.contains("chat.jsonl:2") && err.contains("`conversations[1].from`"),
        "{err}"
    );
}
