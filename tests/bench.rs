//! `ual bench step` and `ual bench head` end to end: they run and print the promised JSON, the
//! step bench's model matches PyTorch + PEFT's parameter counts for the same preset, and the
//! fused head's memory is a fraction of the unfused one's.

mod common;

use serde_json::Value;

fn ual(args: &[&str]) -> Result<Value, String> {
    let out = common::ual().args(args).output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    if !out.status.success() {
        return Err(format!("{}\n{stderr}", out.status));
    }
    let stdout = String::from_utf8(out.stdout).unwrap();
    Ok(serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}")))
}

fn step(device: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "bench",
        "step",
        "--preset",
        "tiny",
        "--device",
        device,
        "--steps",
        "1",
        "--warmup",
        "1",
        "--batch-size",
        "2",
        "--seq-len",
        "64",
    ];
    args.extend_from_slice(extra);
    ual(&args).unwrap()
}

#[test]
fn bench_step_reports_throughput_and_memory() {
    for (device, extra) in [
        ("cpu", vec![]),
        (common::wgpu_spec(), vec!["--base-dtype", "f16"]),
    ] {
        let r = step(device, &extra);
        // The counts scripts/bench_torch.py prints for the same preset (transformers + PEFT).
        assert_eq!(r["parameters"], 2_138_944, "{r}");
        assert_eq!(r["trainable_parameters"], 36_992, "{r}");
        assert_eq!(r["tokens_per_step"], 128, "{r}");
        assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["peak_rss_bytes"].as_u64().unwrap() > 1_000_000, "{r}");
        // Random weights of std 0.02 give near-uniform predictions: ln 32000 = 10.37.
        let loss = r["final_loss"].as_f64().unwrap();
        assert!((loss - 10.37).abs() < 0.3, "{device}: loss {loss}");
        if device == "wgpu" {
            assert!(r["peak_device_bytes"].as_u64().unwrap() > 0, "{r}");
        }
    }
}

#[test]
fn bench_step_rejects_an_unknown_base_dtype() {
    let err = ual(&[
        "bench",
        "step",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--base-dtype",
        "f8",
    ])
    .unwrap_err();
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains("\"q4_0\""), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// 1,024 rows × 32,000: the unfused head holds the logits and their gradient (262 MB); the
/// fused one, blocks of 128 rows (16 MB), so at least 4× less is a loose bound on 8×.
#[test]
fn bench_head_fused_memory_is_a_fraction_of_unfused() {
    let r = ual(&[
        "bench",
        "head",
        "--device",
        "cpu",
        "--rows",
        "1024",
        "--hidden",
        "64",
        "--iters",
        "1",
        "--block-rows",
        "128",
    ])
    .unwrap();
    assert_eq!(
        r["memory_source"], "heap bytes in use (counting allocator)",
        "{r}"
    );
    let fused = r["fused"]["peak_extra_bytes"].as_f64().unwrap();
    let unfused = r["unfused"]["peak_extra_bytes"].as_f64().unwrap();
    assert!(unfused >= 262_144_000.0, "{r}");
    assert!(
        fused > 0.0 && unfused / fused >= 4.0,
        "fused {fused} vs unfused {unfused}"
    );
}
