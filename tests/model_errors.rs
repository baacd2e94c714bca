//! Bad model directories: each is a one-line error that names the file, tensor or field.

mod common;

use std::path::{Path, PathBuf};

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
    let out = common::ual()
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
    let out = common::ual()
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

/// A writable copy of the PEFT adapter fixture for `llama-gqa`.
fn copy_adapter() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    std::fs::create_dir(&adapter).unwrap();
    for entry in std::fs::read_dir(common::fixtures().join("adapters/llama-gqa-peft")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), adapter.join(entry.file_name())).unwrap();
    }
    (tmp, adapter)
}

/// Rewrites the first element of one f32 or f64 tensor of a copied checkpoint with `value`.
fn poke(path: &Path, tensor: &str, value: f32) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    let (_, dtype, _, data) = owned.iter_mut().find(|(n, ..)| n == tensor).unwrap();
    match dtype {
        safetensors::Dtype::F32 => data[..4].copy_from_slice(&value.to_le_bytes()),
        safetensors::Dtype::F64 => data[..8].copy_from_slice(&(value as f64).to_le_bytes()),
        other => panic!("poke an f32 tensor, not {other:?}"),
    }
    let views: Vec<_> = owned
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn a_non_finite_weight_is_named() {
    for value in [f32::NAN, f32::INFINITY] {
        let (_tmp, dir) = copy_fixture("llama-gqa");
        let tensor = "model.layers.1.mlp.up_proj.weight";
        poke(&dir.join("model.safetensors"), tensor, value);
        let msg = load_error(&dir);
        assert!(msg.contains(tensor) && msg.contains("non-finite"), "{msg}");
    }
}

#[test]
fn a_non_finite_adapter_weight_is_named() {
    let (_tmp, adapter) = copy_adapter();
    let tensor = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    poke(&adapter.join("adapter_model.safetensors"), tensor, f32::NAN);
    let err = match Pretrained::load_with_adapter(
        &fixture_model("llama-gqa"),
        Some(&adapter),
        &Device::flex(),
    ) {
        Ok(_) => panic!("an adapter with a NaN loaded"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("lora_A") && err.contains("non-finite"),
        "{err}"
    );
}

#[test]
fn config_fields_ual_does_not_implement_are_refused_by_name() {
    let cases: [(&str, serde_json::Value); 4] = [
        ("hidden_act", "gelu".into()),
        ("rms_norm_eps", (-1.0).into()),
        ("rope_theta", 0.0.into()),
        ("rms_norm_eps", 0.0.into()),
    ];
    for (field, value) in cases {
        let (_tmp, dir) = copy_fixture("llama-gqa");
        edit_config(&dir, |c| c[field] = value.clone());
        let msg = load_error(&dir);
        assert!(
            msg.contains(field) && msg.contains("config.json"),
            "{field}: {msg}"
        );
    }
}

#[test]
fn checkpoint_tensors_the_config_does_not_use_are_an_error() {
    let (_tmp, dir) = copy_fixture("llama-gqa");
    edit_config(&dir, |c| c["num_hidden_layers"] = 1.into());
    let msg = load_error(&dir);
    assert!(
        msg.contains("model.layers.1.") && msg.contains("num_hidden_layers"),
        "{msg}"
    );
}

#[test]
fn an_adapter_missing_a_layer_is_refused_by_name() {
    let (_tmp, adapter) = copy_adapter();
    let path = adapter.join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| !n.contains("layers.1.self_attn.q_proj"))
        .collect();
    safetensors::serialize_to_file(kept, None, &path).unwrap();
    let err = match Pretrained::load_with_adapter(
        &fixture_model("llama-gqa"),
        Some(&adapter),
        &Device::flex(),
    ) {
        Ok(_) => panic!("an adapter without layer 1's q_proj loaded"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("model.layers.1.self_attn.q_proj.lora_A.weight") && err.contains("missing"),
        "{err}"
    );
}
