//! LoRA adapters: PEFT's own adapters load to PEFT's log-probs, and ual's exports reload exactly.

mod common;

use burn::tensor::{Device, Distribution, Tensor};
use common::{devices, fixture_model, fixtures};
use serde::Deserialize;
use ual::eval::score::token_logprobs;
use ual::model::lora::{self, LoraConfig};
use ual::model::{Pretrained, lora::for_each_named, peft};

/// Absolute tolerance on log-probs (nats), as for the base models.
const LOGPROB_ATOL: f64 = 2e-4;

#[derive(Deserialize)]
struct Expected {
    texts: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    ids: Vec<u32>,
    logprobs: Vec<Option<f64>>,
}

/// `llama-gqa-peft` was written by PEFT itself; `llama-gqa-ual` was trained and exported by ual
/// and its expected log-probs computed by PEFT loading it (scripts/make_ual_adapter_fixture.py).
#[test]
fn adapters_reproduce_peft_logprobs_both_ways() {
    for name in ["llama-gqa-peft", "llama-gqa-ual"] {
        let adapter = fixtures().join("adapters").join(name);
        let expected: Expected =
            serde_json::from_str(&std::fs::read_to_string(adapter.join("expected.json")).unwrap())
                .unwrap();
        for (device_name, device) in devices() {
            let p =
                Pretrained::load_with_adapter(&fixture_model("llama-gqa"), Some(&adapter), &device)
                    .unwrap();
            for case in &expected.texts {
                let ours = token_logprobs(&p.model, &case.ids);
                for (j, (a, b)) in ours.iter().zip(&case.logprobs).enumerate().skip(1) {
                    let (a, b) = (a.unwrap() as f64, b.unwrap());
                    assert!(
                        (a - b).abs() <= LOGPROB_ATOL,
                        "{name} {device_name} token {j}: ours {a}, PEFT {b}"
                    );
                }
            }
        }
    }
}

#[test]
fn exported_adapter_reloads_to_identical_logits() {
    let device = Device::flex();
    let dir = fixture_model("qwen2-bias");
    let p = Pretrained::load(&dir, &device).unwrap();
    let config = LoraConfig {
        r: 3,
        alpha: 6.0,
        ..Default::default()
    };
    let mut model = lora::attach(p.model, &config, 0, &device);
    // Fresh adapters have B = 0; give B values so the export is not trivially the base.
    for_each_named(&mut model, |_, proj| {
        if let Some(l) = proj.lora.as_mut() {
            let dims = l.b.dims();
            l.b = burn::module::Param::from_tensor(Tensor::random(
                dims,
                Distribution::Normal(0.0, 0.5),
                &device,
            ));
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    peft::save_peft(&mut model, &config, "qwen2-bias", tmp.path()).unwrap();
    let reloaded = Pretrained::load_with_adapter(&dir, Some(tmp.path()), &device).unwrap();
    let ids = p
        .tokenizer
        .encode("Write a haiku about autumn leaves falling.")
        .unwrap();
    let before = token_logprobs(&model, &ids);
    let after = token_logprobs(&reloaded.model, &ids);
    let base = token_logprobs(&Pretrained::load(&dir, &device).unwrap().model, &ids);
    assert_eq!(
        before, after,
        "a reloaded adapter gives bit-identical log-probs"
    );
    assert_ne!(before, base, "the adapter changes the model");
}

#[test]
fn adapter_for_another_model_is_an_error() {
    let adapter = fixtures().join("adapters/llama-gqa-peft");
    let err = Pretrained::load_with_adapter(
        &fixture_model("mistral-f16"),
        Some(&adapter),
        &Device::flex(),
    )
    .err()
    .unwrap();
    let msg = format!("{err:#}");
    assert!(msg.contains("shape") || msg.contains("no tensor"), "{msg}");
}

#[test]
fn merged_model_gives_the_adapters_logprobs() {
    let adapter = fixtures().join("adapters/llama-gqa-peft");
    let expected: Expected =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("expected.json")).unwrap())
            .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let output = tmp.path().join("merged");
    let status = common::ual()
        .args(["merge", "--device", "cpu", "--model"])
        .arg(fixture_model("llama-gqa"))
        .arg("--adapter")
        .arg(&adapter)
        .arg("--output")
        .arg(&output)
        .status()
        .unwrap();
    assert!(status.success());
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(output.join(f).is_file(), "merged directory lacks {f}");
    }
    for (device_name, device) in devices() {
        let merged = Pretrained::load(&output, &device).unwrap();
        for case in &expected.texts {
            let ours = token_logprobs(&merged.model, &case.ids);
            for (j, (a, b)) in ours.iter().zip(&case.logprobs).enumerate().skip(1) {
                let (a, b) = (a.unwrap() as f64, b.unwrap());
                assert!(
                    (a - b).abs() <= LOGPROB_ATOL,
                    "{device_name} token {j}: merged {a}, PEFT {b}"
                );
            }
        }
    }
}

#[test]
fn merge_keeps_the_base_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture_model("llama-tied-bf16");
    let device = Device::flex();
    let p = Pretrained::load(&dir, &device).unwrap();
    let config = LoraConfig {
        r: 2,
        alpha: 4.0,
        ..Default::default()
    };
    let mut model = lora::attach(p.model, &config, 0, &device);
    let adapter = tmp.path().join("adapter");
    peft::save_peft(&mut model, &config, "llama-tied-bf16", &adapter).unwrap();
    let output = tmp.path().join("merged");
    let status = common::ual()
        .args(["merge", "--device", "cpu", "--model"])
        .arg(&dir)
        .args([
            "--adapter".as_ref(),
            adapter.as_os_str(),
            "--output".as_ref(),
            output.as_os_str(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let checkpoint = ual::model::load::SafetensorsFile::open(&output).unwrap();
    assert_eq!(
        checkpoint.dtype("model.embed_tokens.weight").unwrap(),
        safetensors::Dtype::BF16
    );
    assert!(
        !checkpoint.contains("lm_head.weight"),
        "a tied head stays tied"
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(output.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
}
