//! `ual score --data`: per-line response NLL and UAL loss equal transformers + PyTorch's
//! `cross_entropy(label_smoothing=ε)` on the response tokens.

mod common;

use common::{devices, fixture_model, fixtures};
use serde::Deserialize;
use ual::data::batch::Prepare;
use ual::data::formats::read_jsonl;
use ual::data::template::Template;
use ual::eval::score::score_sample;
use ual::model::Pretrained;

/// Relative tolerance on per-line losses (f32 compute against a float64 reference).
const LOSS_RTOL: f64 = 1e-4;

#[derive(Deserialize)]
struct Expected {
    lines: Vec<Line>,
}

#[derive(Deserialize)]
struct Line {
    index: usize,
    ids: Vec<u32>,
    response_start: usize,
    smoothing: f64,
    nll: f64,
    loss: f64,
}

fn expected() -> Expected {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("score/expected.json")).unwrap())
        .unwrap()
}

#[test]
fn data_scores_match_pytorch_label_smoothing() {
    let expected = expected();
    let examples = read_jsonl(&fixtures().join("score/data.jsonl")).unwrap();
    for (device_name, device) in devices() {
        let p = Pretrained::load(&fixture_model("llama-gqa"), &device).unwrap();
        let (samples, _) = Prepare::new(&p.tokenizer, &Template::Alpaca, 2, 512)
            .examples(&examples)
            .unwrap();
        assert_eq!(samples.len(), expected.lines.len());
        for (sample, line) in samples.iter().zip(&expected.lines) {
            assert_eq!(sample.ids, line.ids, "line {}: token ids", line.index);
            assert_eq!(
                sample.response_start(),
                line.response_start,
                "line {}: response start",
                line.index
            );
            assert!(
                (sample.smoothing as f64 - line.smoothing).abs() < 1e-6,
                "line {}: ε",
                line.index
            );
            let ours = score_sample(&p.model, sample, line.index).unwrap();
            for (what, a, b) in [("nll", ours.nll, line.nll), ("loss", ours.loss, line.loss)] {
                assert!(
                    (a - b).abs() <= LOSS_RTOL * b.abs(),
                    "{device_name} line {} {what}: ours {a}, PyTorch {b}",
                    line.index
                );
            }
            // The fixture has real smoothing on some lines, so loss and NLL must differ there.
            if line.smoothing > 0.0 {
                assert!((ours.loss - ours.nll).abs() > 1e-3);
            }
        }
    }
}

#[test]
fn score_data_cli_prints_one_json_line_per_data_line() {
    let out = common::ual()
        .args(["score", "--device", "cpu", "--model"])
        .arg(fixture_model("llama-gqa"))
        .arg("--data")
        .arg(fixtures().join("score/data.jsonl"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = expected();
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), expected.lines.len());
    for (got, want) in lines.iter().zip(&expected.lines) {
        assert_eq!(got["index"].as_u64().unwrap() as usize, want.index);
        assert_eq!(
            got["response_tokens"].as_u64().unwrap() as usize,
            want.ids.len() - want.response_start
        );
        let loss = got["loss"].as_f64().unwrap();
        assert!(
            (loss - want.loss).abs() <= LOSS_RTOL * want.loss.abs(),
            "{loss} vs {}",
            want.loss
        );
    }
}
