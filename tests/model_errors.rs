//! Bad model directories: each is a one-line error that names the file, tensor or field.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::tensor::Device;
use common::fixture_model;
use safetensors::SafeTensors;
use ual::model::Pretrained;

/// A writable copy of a fixture model.
fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(fixture_model(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    (tmp, dir)
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(path, config.to_string()).unwrap();
}

fn load_error(dir: &Path) -> String {
    match Pretrained::load(dir, &Device::flex()) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(err) => format!("{err:#}"),
    }
}

#[test]
fn unsupported_model_type_lists_the_supported_ones() {
    let (_tmp, dir) = copy_fixture("llama-gqa");
    edit_config(&dir, |c| c["model_type"] = "gpt_neox".into());
    let msg = load_error(&dir);
    assert!(
        msg.contains("config.json") && msg.contains("gpt_neox"),
        "{msg}"
    );
    assert!(msg.contains("llama, mistral, qwen2"), "{msg}");
}

#[test]
fn missing_tensor_is_named() {
    let (_tmp, dir) = copy_fixture("llama-gqa");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let dropped = "model.layers.1.mlp.up_proj.weight";
    let kept: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != dropped)
        .collect();
    safetensors::serialize_to_file(kept, None, &path).unwrap();
    let msg = load_error(&dir);
    assert!(msg.contains(dropped) && msg.contains("missing"), "{msg}");
}

#[test]
fn wrong_shape_is_named() {
    let (_tmp, dir) = copy_fixture("qwen2-bias");
    edit_config(&dir, |c| c["intermediate_size"] = 30.into());
    let msg = load_error(&dir);
    assert!(
        msg.contains("model.layers.0.mlp.gate_proj.weight") && msg.contains("shape"),
        "{msg}"
    );
}

#[test]
fn tokenizer_larger_than_embedding_is_an_error() {
    let (_tmp, dir) = copy_fixture("mistral-f16");
    edit_config(&dir, |c| c["vocab_size"] = 1000.into());
    let msg = load_error(&dir);
    assert!(
        msg.contains("tokenizer.json") && msg.contains("1000"),
        "{msg}"
    );
}

#[test]
fn missing_shard_is_named() {
    let (_tmp, dir) = copy_fixture("mistral-f16");
    std::fs::remove_file(dir.join("model-00002-of-00003.safetensors")).unwrap();
    let msg = load_error(&dir);
    assert!(msg.contains("model-00002-of-00003.safetensors"), "{msg}");
}

#[test]
fn cli_reports_one_line_and_fails() {
    let (_tmp, dir) = copy_fixture("llama-gqa");
    edit_config(&dir, |c| c["model_type"] = "falcon".into());
    let out = Command::new(env!("CARGO_BIN_EXE_ual"))
        .args(["score", "--device", "cpu", "--text", "hi", "--model"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "no partial output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<_> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("falcon") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[test]
fn cli_scores_json() {
    let out = Command::new(env!("CARGO_BIN_EXE_ual"))
        .args([
            "score",
            "--device",
            "cpu",
            "--json",
            "--text",
            "Hello world",
            "--model",
        ])
        .arg(fixture_model("llama-gqa"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids = line["ids"].as_array().unwrap();
    let lps = line["logprobs"].as_array().unwrap();
    assert_eq!(ids.len(), lps.len());
    assert!(lps[0].is_null() && lps[1].as_f64().unwrap() < 0.0);
}
