//! The first run a new user makes: `ual train` with no arguments on the bundled tiny model and
//! data. It must end without an `error:` line (the Vulkan loader's window-system probe on a
//! headless machine included), say in words what happened, and visibly learn.

mod common;

/// The bar: the held-out NLL falls by at least this many nats over the bundled run.
const MIN_HELD_OUT_DROP: f64 = 0.3;

#[test]
fn the_bundled_run_learns_and_says_so_without_an_error_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = common::ual()
        .env_remove("XDG_RUNTIME_DIR")
        .args(["train", "--set"])
        .arg(format!("output_dir={:?}", tmp.path().display().to_string()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.lines().any(|l| l.contains("error:")),
        "an error line on a successful run:\n{stderr}"
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let before = summary["initial_eval_nll"].as_f64().unwrap();
    let after = summary["final_eval_nll"].as_f64().unwrap();
    assert!(
        after <= before - MIN_HELD_OUT_DROP,
        "held-out NLL {before} -> {after}: the bundled run must visibly learn"
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!(
            "held-out NLL {before:.2} → {after:.2} over 60 steps"
        )),
        "the run's last line says what happened: {last}"
    );
    assert!(
        last.ends_with("adapter: ") || last.contains("tiny-ual/adapter"),
        "{last}"
    );
    let run = tmp.path().join("tiny-ual");
    for file in [
        "adapter/adapter_model.safetensors",
        "loss.svg",
        "metrics.jsonl",
    ] {
        assert!(run.join(file).is_file(), "{file}");
    }
    // Every step reports its NLL beside its loss; held-out steps their held-out NLL.
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 60);
    assert!(
        lines
            .iter()
            .all(|m| m["nll"].as_f64().is_some_and(f64::is_finite))
    );
    assert!(lines.iter().filter(|m| m["eval_nll"].is_f64()).count() >= 6);
}

/// A fresh machine needs no MPI: the default build (without the `mpi` feature) links no MPI
/// library, and under an MPI launcher's environment it still runs as the only rank.
#[cfg(all(target_os = "linux", not(feature = "mpi")))]
#[test]
fn the_default_build_needs_no_mpi() {
    let ldd = std::process::Command::new("ldd")
        .arg(env!("CARGO_BIN_EXE_ual"))
        .output()
        .expect("ldd (Debian: libc-bin)");
    assert!(ldd.status.success());
    let linked = String::from_utf8_lossy(&ldd.stdout);
    assert!(
        linked.contains("libc.so"),
        "ldd lists the libraries: {linked}"
    );
    assert!(!linked.contains("libmpi"), "{linked}");
    // As if mpirun had started it: without the feature, ual is one process on its own.
    let out = common::ual()
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .env("XDG_RUNTIME_DIR", "/tmp")
        .args(["score", "--model", "models/tiny"])
        .args(["--text", "one two", "--json", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("logprobs"));
}

/// `ual devices --json` names the shader compiler of every adapter it lists; with
/// `UAL_REQUIRE_WGPU=1` (CI) it must list one.
#[test]
fn devices_name_each_adapters_compiler() {
    let out = common::ual().args(["devices", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    if listed.is_empty() {
        assert_ne!(
            std::env::var("UAL_REQUIRE_WGPU").as_deref(),
            Ok("1"),
            "UAL_REQUIRE_WGPU=1 but `ual devices` lists no adapter"
        );
        eprintln!("NOTICE: no wgpu adapter; `ual devices` listed nothing to check");
        return;
    }
    for adapter in &listed {
        let compiler = adapter["compiler"].as_str();
        assert!(
            matches!(compiler, Some("wgsl" | "spirv" | "msl")),
            "{adapter}"
        );
        // A build without the native compilers gives every adapter WGSL.
        if !cfg!(feature = "native-compilers") {
            assert_eq!(compiler, Some("wgsl"), "{adapter}");
        }
    }
}

#[test]
fn train_takes_the_common_settings_as_flags() {
    // The flags are the config's keys: what they set is what config.toml records.
    let out_dir = std::env::temp_dir().join(format!("ual-test-flags-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    let (_, said) = common::ual_run(&[
        "train",
        "--device",
        "cpu",
        "--model",
        "models/tiny",
        "--data",
        "models/tiny/data/train.jsonl",
        "--template",
        "alpaca",
        "--steps",
        "2",
        "--lr",
        "3e-4",
        "--name",
        "flag run",
        "--output-dir",
        out_dir.to_str().unwrap(),
    ]);
    // stderr is not a terminal here: progress comes as plain lines, the last step's included.
    assert!(
        said.contains("step 1/2: loss ") && said.contains("step 2/2: loss "),
        "{said}"
    );
    assert!(said.contains("ETA"), "{said}");
    let written = std::fs::read_to_string(out_dir.join("flag run/config.toml")).unwrap();
    let config: toml::Value = toml::from_str(&written).unwrap();
    assert_eq!(config["steps"].as_integer(), Some(2));
    assert_eq!(config["optim"]["lr"].as_float(), Some(3e-4));
    assert_eq!(config["template"].as_str(), Some("alpaca"));
    assert_eq!(
        config["train_data"].as_str(),
        Some("models/tiny/data/train.jsonl")
    );
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("flag run/summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["nll_window"], 1);
    assert!(summary["train_nll_first"].as_f64().unwrap() > 0.0);
    let plot = std::fs::read_to_string(out_dir.join("flag run/loss.svg")).unwrap();
    assert!(plot.contains("<circle"), "held-out evaluations are marked");
    let _ = std::fs::remove_dir_all(&out_dir);
}

#[test]
fn print_config_lists_every_key_and_outside_a_clone_the_defaults_ask_for_flags() {
    let (text, _) = common::ual_run(&[
        "train",
        "--print-config",
        "--lr",
        "1e-4",
        "--set",
        "lora.r=4",
    ]);
    assert!(
        text.contains("optim.lr = 0.0001  # The peak learning rate:"),
        "{text}"
    );
    assert!(text.contains("lora.r = 4  # "), "{text}");
    assert!(
        text.lines()
            .all(|l| l.contains(" = ") && l.contains("  # ")),
        "{text}"
    );
    assert!(text.lines().count() >= 40, "every key: {text}");

    let elsewhere = tempfile::tempdir().unwrap();
    let out = common::ual()
        .current_dir(elsewhere.path())
        .args(["train", "--device", "cpu"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("pass --model"),
        "{err}"
    );
}
