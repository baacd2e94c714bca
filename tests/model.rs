//! The decoder against transformers: every fixture model's per-token log-probs, on CPU and wgpu.

mod common;

use std::path::Path;

use common::{FIXTURE_MODELS, devices, fixture_model};
use serde::Deserialize;
use ual::eval::score::token_logprobs;
use ual::model::Pretrained;

/// Absolute tolerance on log-probs (nats), per issue #2.
const LOGPROB_ATOL: f64 = 2e-4;

#[derive(Deserialize)]
struct Expected {
    texts: Vec<ExpectedText>,
}

#[derive(Deserialize)]
struct ExpectedText {
    text: String,
    ids: Vec<u32>,
    logprobs: Vec<Option<f64>>,
}

fn expected(dir: &Path) -> Expected {
    let text = std::fs::read_to_string(dir.join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn logprobs_match_transformers_on_every_device() {
    for (device_name, device) in devices() {
        for name in FIXTURE_MODELS {
            let dir = fixture_model(name);
            let pretrained = Pretrained::load(&dir, &device).unwrap();
            for case in expected(&dir).texts {
                let ids = pretrained.tokenizer.encode(&case.text).unwrap();
                assert_eq!(
                    ids, case.ids,
                    "{name}: token ids differ from the HF tokenizer's"
                );
                let ours = token_logprobs(&pretrained.model, &ids);
                assert_eq!(ours[0], None);
                let mut worst = 0f64;
                for (j, (a, b)) in ours.iter().zip(&case.logprobs).enumerate().skip(1) {
                    let (a, b) = (a.unwrap() as f64, b.unwrap());
                    worst = worst.max((a - b).abs());
                    assert!(
                        (a - b).abs() <= LOGPROB_ATOL,
                        "{name} on {device_name}, {:?} token {j}: ours {a}, transformers {b}",
                        case.text
                    );
                }
                eprintln!("{name} on {device_name}: max |Δlogprob| = {worst:.2e}");
            }
        }
    }
}

#[test]
fn llama_tokenizer_prefixes_bos() {
    let dir = fixture_model("llama-gqa");
    let pretrained = Pretrained::load(&dir, &burn::tensor::Device::flex()).unwrap();
    for case in expected(&dir).texts {
        let ids = pretrained.tokenizer.encode(&case.text).unwrap();
        assert_eq!(ids[0], 1, "Llama-2 BOS");
        assert_eq!(&ids[..8], &case.ids[..8]);
    }
}
