//! Shared test helpers: fixture paths and the devices every numeric test runs on.
#![allow(dead_code)]

use std::path::PathBuf;

use burn::tensor::Device;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
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
