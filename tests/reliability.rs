//! Bad settings and diverging runs end with one clear error and leave nothing half-written.

mod common;

use std::path::{Path, PathBuf};

use common::fixture_model;
use ual::model::Pretrained;
use ual::model::generate::{Finish, GenerationConfig, generate};
use ual::train::TrainConfig;

/// `ual train` with `sets` on the bundled model and data, into `dir`.
fn train(dir: &Path, sets: &[&str]) -> (bool, String) {
    train_env(dir, sets, None, false)
}

#[test]
fn optimizer_settings_outside_their_domain_are_refused_by_name() {
    for (set, key) in [
        ("optim.beta1=1.0", "optim.beta1"),
        ("optim.beta2=-0.1", "optim.beta2"),
        ("optim.eps=0", "optim.eps"),
        ("optim.weight_decay=-1", "optim.weight_decay"),
        ("optim.max_grad_norm=-1", "optim.max_grad_norm"),
        ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio"),
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=inf", "optim.lr"),
    ] {
        let err = format!(
            "{:#}",
            TrainConfig::resolve(None, &[set.to_string()]).unwrap_err()
        );
        assert!(err.contains(&format!("`{key}`")), "{set}: {err}");
    }
    assert!(TrainConfig::resolve(None, &["optim.max_grad_norm=0".into()]).is_ok());
}

#[test]
fn a_name_cannot_leave_the_output_directory() {
    for name in ["../../x", "a/b", "..", ""] {
        let err = TrainConfig::resolve(None, &[format!("name={name:?}")]).unwrap_err();
        assert!(
            format!("{err:#}").contains("plain directory name"),
            "{name}: {err:#}"
        );
    }
}

/// lr = 1e38 makes the second step's loss non-finite: the run stops there with an error naming
/// the step, writes no adapter and no summary, and keeps no metrics line of the broken step.
#[test]
fn a_diverging_run_stops_at_the_first_non_finite_loss_and_exports_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, stderr) = train(
        tmp.path(),
        &["optim.lr=1e38", "steps=6", "checkpoint_every=0"],
    );
    assert!(!ok, "a diverged run must fail");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("training diverged"), "{stderr}");
    let run = tmp.path().join("tiny-ual");
    assert!(
        !run.join("adapter").exists(),
        "nothing is exported from a diverged run"
    );
    assert!(!run.join("summary.json").exists());
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    for line in metrics.lines() {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(m["loss"].as_f64().is_some_and(f64::is_finite), "{line}");
    }
}

/// Under f16's loss scale too: a non-finite forward loss is divergence, not an overflow to skip
/// (steps 2–4 were once logged as skips and step 4's checkpoint written from the diverged
/// weights, so the run could not resume).
#[test]
fn an_f16_run_whose_loss_diverges_stops_rather_than_skipping() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, stderr) = train(
        tmp.path(),
        &[
            "precision=\"f16\"",
            "optim.lr=1e30",
            "steps=6",
            "checkpoint_every=4",
            "device=\"cpu\"",
        ],
    );
    assert!(!ok, "a diverged f16 run must fail: {stderr}");
    assert!(stderr.contains("training diverged"), "{stderr}");
    let run = tmp.path().join("tiny-ual");
    assert!(
        !run.join("checkpoint").exists(),
        "no checkpoint of diverged weights: {stderr}"
    );
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    for line in metrics.lines() {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(m["loss"].as_f64().is_some_and(f64::is_finite), "{line}");
    }
}

#[test]
fn max_seq_len_beyond_the_models_positions_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, stderr) = train(tmp.path(), &["max_seq_len=4096"]);
    assert!(!ok);
    assert!(stderr.contains("exceeds the 1024 positions"), "{stderr}");
}

/// Overrides that would change what the checkpoint's tensors mean are refused on resume; the
/// listed safe ones are taken.
#[test]
fn resume_refuses_overrides_that_change_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, stderr) = train(
        tmp.path(),
        &["steps=2", "checkpoint_every=1", "eval_every=0"],
    );
    assert!(ok, "{stderr}");
    let run = tmp.path().join("tiny-ual");
    for set in [
        "lora.r=4",
        "lora.alpha=64",
        "mode=\"full\"",
        "smoothing.loss=\"sft\"",
    ] {
        let err = TrainConfig::for_resume(&run, &[set.into()]).unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains("cannot change on --resume"), "{set}: {err}");
        assert!(
            err.contains("steps, epochs"),
            "the safe keys are listed: {err}"
        );
    }
    let resumed =
        TrainConfig::for_resume(&run, &["steps=3".into(), "eval_every=1".into()]).unwrap();
    assert_eq!((resumed.steps, resumed.eval_every), (3, 1));
}

/// A run resumed without its held-out set reports no held-out loss: an earlier step's
/// evaluation was once reported as the final one ("held out: 0", then "held-out NLL 4.18 →
/// 3.23").
#[test]
fn a_resume_without_the_held_out_set_reports_no_held_out_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, stderr) = train(
        tmp.path(),
        &["steps=2", "checkpoint_every=1", "eval_every=1"],
    );
    assert!(ok, "{stderr}");
    let run = tmp.path().join("tiny-ual");
    let out = common::ual()
        .args([
            "train",
            "--device",
            "cpu",
            "--set",
            "steps=3",
            "--set",
            "eval_data=",
            "--resume",
        ])
        .arg(&run)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("held-out NLL"), "{stderr}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert!(summary["final_eval_loss"].is_null(), "{summary}");
    assert!(summary["initial_eval_loss"].is_null(), "{summary}");
}

/// `batch_size` may be set on resume only so that another number of MPI ranks keeps the global
/// micro-batch; on one rank any other value changes the data order and is refused.
#[test]
fn resume_refuses_a_batch_size_that_changes_the_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, stderr) = train(
        tmp.path(),
        &[
            "steps=2",
            "checkpoint_every=1",
            "eval_every=0",
            "batch_size=4",
        ],
    );
    assert!(ok, "{stderr}");
    let run = tmp.path().join("tiny-ual");
    let out = common::ual()
        .args([
            "train",
            "--device",
            "cpu",
            "--set",
            "batch_size=8",
            "--resume",
        ])
        .arg(&run)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("1 rank(s) × batch_size 4 = 4 samples per micro-batch")
            && stderr.contains("--set batch_size=4"),
        "{stderr}"
    );
}

/// Decoding stops at the model's last position: a 250-token prompt on a 256-position model
/// gets at most 6 new tokens, however many are asked for.
#[test]
fn generation_is_capped_at_the_models_positions() {
    let p = Pretrained::load(&fixture_model("llama-gqa"), &burn::tensor::Device::flex()).unwrap();
    let positions = p.config.max_position_embeddings;
    assert_eq!(positions, 256);
    let prompt: Vec<u32> = (0..250).map(|i| 100 + i % 50).collect();
    let config = GenerationConfig {
        max_new_tokens: 40,
        ..Default::default()
    };
    // No EOS, so only the cap can stop it.
    let out = generate(
        &p.model,
        &p.tokenizer,
        &[],
        &[prompt],
        &[0],
        &config,
        |_, _| {},
    )
    .unwrap();
    assert_eq!(out[0].ids.len(), positions - 250);
    assert_eq!(out[0].finish, Finish::Length);
    let too_long = vec![5u32; positions];
    let err = generate(
        &p.model,
        &p.tokenizer,
        &[],
        &[too_long],
        &[0],
        &config,
        |_, _| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("256 positions"), "{err}");
}

/// `ual merge` with the fixture model and its PEFT adapter into `output`.
fn merge(model: &Path, output: &Path, extra: &[&str]) -> (bool, String) {
    let adapter = common::fixtures().join("adapters/llama-gqa-peft");
    let out = common::ual()
        .args(["merge", "--device", "cpu", "--model"])
        .arg(model)
        .arg("--adapter")
        .arg(&adapter)
        .arg("--output")
        .arg(output)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A copy of the fixture model that a test may lose.
fn model_copy(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(fixture_model("llama-gqa")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    model
}

fn listing(dir: &Path) -> Vec<(String, u64)> {
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    files.sort();
    files
}

/// `merge` never writes into the model directory, refuses a non-empty output unless `--force`
/// (and then keeps its other files), and deletes nothing of anyone else's: not a sibling named
/// like its temporary directory, not the model.
#[test]
fn merge_protects_the_model_and_existing_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_copy(tmp.path());
    let before = listing(&model);
    for output in [model.clone(), model.join("merged")] {
        let (ok, stderr) = merge(&model, &output, &["--force"]);
        assert!(!ok, "{}: {stderr}", output.display());
        assert!(stderr.contains("model directory"), "{stderr}");
    }
    assert_eq!(listing(&model), before, "the model directory is untouched");

    let output = tmp.path().join("run.v2");
    let sibling = tmp.path().join("run.tmp");
    std::fs::create_dir_all(&output).unwrap();
    std::fs::create_dir_all(&sibling).unwrap();
    std::fs::write(output.join("notes.txt"), "mine").unwrap();
    std::fs::write(sibling.join("keep.txt"), "mine too").unwrap();
    let (ok, stderr) = merge(&model, &output, &[]);
    assert!(!ok && stderr.contains("--force"), "{stderr}");
    assert_eq!(
        listing(&output),
        [("notes.txt".to_string(), 4)],
        "nothing written"
    );
    let (ok, stderr) = merge(&model, &output, &["--force"]);
    assert!(ok, "{stderr}");
    assert_eq!(
        std::fs::read_to_string(output.join("notes.txt")).unwrap(),
        "mine"
    );
    assert!(output.join("model.safetensors").is_file());
    assert_eq!(
        std::fs::read_to_string(sibling.join("keep.txt")).unwrap(),
        "mine too"
    );
    let strays: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".ual-"))
        .collect();
    assert!(strays.is_empty(), "temporary directories left: {strays:?}");
}

/// A copy of the PEFT fixture adapter, its config edited by `edit` and `extra` tensors (zeros
/// of shape `[2, 2]`) added to its weights.
fn adapter_copy(dir: &Path, edit: impl Fn(&mut serde_json::Value), extra: &[&str]) -> PathBuf {
    let source = common::fixtures().join("adapters/llama-gqa-peft");
    let target = dir.join("adapter");
    std::fs::create_dir_all(&target).unwrap();
    let text = std::fs::read_to_string(source.join("adapter_config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut config);
    std::fs::write(target.join("adapter_config.json"), config.to_string()).unwrap();
    let bytes = std::fs::read(source.join("adapter_model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let zeros = vec![0u8; 16];
    let mut views: Vec<(String, safetensors::tensor::TensorView)> =
        file.tensors().into_iter().collect();
    for name in extra {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 2], &zeros)
                .unwrap();
        views.push((name.to_string(), view));
    }
    safetensors::serialize_to_file(views, None, &target.join("adapter_model.safetensors")).unwrap();
    target
}

/// Every adapter tensor must land on a projection, and every target module must name one.
#[test]
fn partial_or_foreign_adapters_fail_naming_what_does_not_fit() {
    let device = burn::tensor::Device::flex();
    let load = |adapter: &Path| {
        Pretrained::load_with_adapter(&fixture_model("llama-gqa"), Some(adapter), &device)
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    };
    let tmp = tempfile::tempdir().unwrap();
    let same = adapter_copy(&tmp.path().join("same"), |_| {}, &[]);
    assert_eq!(load(&same), Ok(()), "the unedited copy loads");
    let stray = "base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight";
    let extra = adapter_copy(&tmp.path().join("extra"), |_| {}, &[stray]);
    let err = load(&extra).unwrap_err();
    assert!(err.contains(stray), "{err}");
    let gpt2 = adapter_copy(
        &tmp.path().join("gpt2"),
        |c| c["target_modules"] = serde_json::json!(["c_attn"]),
        &[],
    );
    let err = load(&gpt2).unwrap_err();
    assert!(
        err.contains("c_attn") && err.contains("target_modules"),
        "{err}"
    );
}

/// A byte-order mark is skipped; bytes that are not UTF-8 are an error naming the line.
#[test]
fn jsonl_with_a_bom_reads_and_invalid_utf8_names_its_line() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("data.jsonl");
    let line = br#"{"instruction": "Say hi.", "output": "Hi."}"#;
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend_from_slice(line);
    bytes.extend_from_slice(b"\r\n");
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(ual::data::formats::read_jsonl(&path).unwrap().len(), 1);
    bytes.extend_from_slice(b"{\"instruction\": \"caf\xE9\", \"output\": \"x\"}\n");
    std::fs::write(&path, &bytes).unwrap();
    let err = format!("{:#}", ual::data::formats::read_jsonl(&path).unwrap_err());
    assert!(
        err.contains("data.jsonl:2") && err.contains("invalid UTF-8"),
        "{err}"
    );
}

/// A huge line costs what its kept tokens cost: the text is cut before it is tokenised, and the
/// kept tokens are those of the whole line.
#[test]
fn a_huge_line_is_cut_before_it_is_tokenised() {
    use ual::data::batch::Prepare;
    use ual::data::formats::parse_line;
    use ual::data::template::Template;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tokenizer =
        ual::data::tokenizer::Tokenizer::from_file(&root.join("models/tiny/tokenizer.json"), 32000)
            .unwrap();
    let line = |words: usize| {
        let output = "the quick brown fox jumps over the lazy dog ".repeat(words / 9 + 1);
        json_line(&output)
    };
    let prepare = Prepare::new(&tokenizer, &Template::Alpaca, 2, 64);
    let started = std::time::Instant::now();
    let (huge, summary) = prepare
        .examples(&[parse_line(&line(1_000_000), 1).unwrap()])
        .unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let (small, _) = prepare
        .examples(&[parse_line(&line(500), 1).unwrap()])
        .unwrap();
    assert_eq!(summary.truncated, 1);
    assert_eq!(huge[0].ids.len(), 64);
    assert_eq!(
        huge[0].ids, small[0].ids,
        "the kept tokens do not depend on the cut"
    );
    assert!(
        seconds < 5.0,
        "a 4.4 MB line took {seconds:.1} s to prepare"
    );
}

fn json_line(output: &str) -> String {
    serde_json::json!({"instruction": "Write.", "output": output}).to_string()
}

/// `ual train` into `dir` with `sets` (or `--resume` of its run), with `UAL_TEST_ABORT_AT` set
/// when `abort_at` is given.
fn train_env(dir: &Path, sets: &[&str], abort_at: Option<&str>, resume: bool) -> (bool, String) {
    let mut command = common::ual();
    command
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["train", "--device", "cpu"]);
    if resume {
        command.arg("--resume").arg(dir.join("tiny-ual"));
    } else {
        command
            .arg("--set")
            .arg(format!("output_dir={:?}", dir.display().to_string()));
        for s in sets {
            command.args(["--set", s]);
        }
    }
    if let Some(point) = abort_at {
        command.env("UAL_TEST_ABORT_AT", point);
    }
    let out = command.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// A process killed between the two renames of the checkpoint swap (a real abort, with no
/// clean-up, at a named point) leaves `checkpoint.old/` and `checkpoint.tmp/` and no
/// `checkpoint/`; `--resume` takes the newer complete one and reproduces the uninterrupted run.
#[test]
fn a_kill_in_the_checkpoint_swap_loses_nothing() {
    let sets = ["steps=4", "checkpoint_every=1", "eval_every=0"];
    let whole = tempfile::tempdir().unwrap();
    let (ok, stderr) = train_env(whole.path(), &sets, None, false);
    assert!(ok, "{stderr}");
    let killed = tempfile::tempdir().unwrap();
    let (ok, _) = train_env(killed.path(), &sets, Some("checkpoint-swap:2"), false);
    assert!(!ok, "the process was aborted");
    let run = killed.path().join("tiny-ual");
    assert!(!run.join("checkpoint").exists());
    assert!(run.join("checkpoint.old").is_dir() && run.join("checkpoint.tmp").is_dir());
    let (ok, stderr) = train_env(killed.path(), &[], None, true);
    assert!(ok, "{stderr}");
    assert_eq!(
        losses(&run),
        losses(&whole.path().join("tiny-ual")),
        "bit-identical losses"
    );
    let adapter =
        |dir: &Path| std::fs::read(dir.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(adapter(&run), adapter(&whole.path().join("tiny-ual")));
    assert!(!run.join("checkpoint.old").exists() && !run.join("checkpoint.tmp").exists());
}

/// An f16 run logs its loss scale each step and keeps it in its checkpoints, so a killed run
/// resumes with the scale it had and reproduces the uninterrupted one; bf16 on an adapter whose
/// compiler lacks it is a one-line refusal.
#[test]
fn an_f16_run_keeps_its_loss_scale_across_a_resume() {
    let sets = [
        "steps=4",
        "checkpoint_every=1",
        "eval_every=0",
        "precision=f16",
    ];
    let whole = tempfile::tempdir().unwrap();
    let (ok, stderr) = train_env(whole.path(), &sets, None, false);
    assert!(ok, "{stderr}");
    let metrics = std::fs::read_to_string(whole.path().join("tiny-ual/metrics.jsonl")).unwrap();
    for line in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["loss_scale"].as_f64(), Some(65536.0), "{line}");
    }
    let state =
        std::fs::read_to_string(whole.path().join("tiny-ual/checkpoint/state.json")).unwrap();
    assert!(state.contains("\"loss_scale\""), "{state}");
    let killed = tempfile::tempdir().unwrap();
    let (ok, _) = train_env(killed.path(), &sets, Some("checkpoint-swap:3"), false);
    assert!(!ok, "the process was aborted");
    let (ok, stderr) = train_env(killed.path(), &[], None, true);
    assert!(ok, "{stderr}");
    assert_eq!(
        losses(&killed.path().join("tiny-ual")),
        losses(&whole.path().join("tiny-ual")),
        "bit-identical losses"
    );
    if common::wgpu_spec() == "wgpu" {
        let out = common::ual()
            .args(["train", "--device", "wgpu", "--set", "precision=bf16"])
            .arg("--set")
            .arg(format!(
                "output_dir={:?}",
                killed.path().join("bf16").display().to_string()
            ))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "bf16 on WGSL must be refused");
        let error: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(error.len(), 1, "{stderr}");
        assert!(error[0].contains("no bf16 arithmetic"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        let run_dir = killed.path().join("bf16/tiny-ual");
        assert!(
            !run_dir.exists(),
            "a refused run leaves {}",
            run_dir.display()
        );
    }
}

/// A checkpoint whose file was damaged after the fact fails its manifest and is not resumed
/// from; the error says why.
#[test]
fn a_damaged_checkpoint_is_not_resumed_from() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, stderr) = train_env(
        tmp.path(),
        &["steps=2", "checkpoint_every=1", "eval_every=0"],
        None,
        false,
    );
    assert!(ok, "{stderr}");
    let state = tmp.path().join("tiny-ual/checkpoint/state.json");
    let text = std::fs::read_to_string(&state).unwrap();
    // The last step is checkpointed too: the checkpoint is step 2's.
    assert!(text.contains("\"step\": 2"), "{text}");
    std::fs::write(&state, text.replace("\"step\": 2", "\"step\": 9")).unwrap();
    let (ok, stderr) = train_env(tmp.path(), &[], None, true);
    assert!(!ok);
    assert!(stderr.contains("no complete checkpoint"), "{stderr}");
}

/// A fresh run into a directory that holds one is refused; `--overwrite` starts it again; a
/// second `ual train` into a directory in use is refused while the first holds its lock.
#[test]
fn a_run_directory_is_claimed_once() {
    let tmp = tempfile::tempdir().unwrap();
    let sets = ["steps=2", "eval_every=0", "checkpoint_every=0"];
    let (ok, stderr) = train(tmp.path(), &sets);
    assert!(ok, "{stderr}");
    let (ok, stderr) = train(tmp.path(), &sets);
    assert!(!ok && stderr.contains("holds a run already"), "{stderr}");
    let out = common::ual()
        .args(["train", "--device", "cpu", "--overwrite", "--set"])
        .arg(format!("output_dir={:?}", tmp.path().display().to_string()))
        .args(sets.iter().flat_map(|s| ["--set", s]))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Two processes at once: the second finds the directory locked.
    let busy = tempfile::tempdir().unwrap();
    let mut first = long_run(busy.path());
    wait_for_steps(&busy.path().join("tiny-ual"), 1, &mut first);
    let (ok, stderr) = train(busy.path(), &["steps=2"]);
    assert!(!ok && stderr.contains("in use by another"), "{stderr}");
    first.kill().unwrap();
    first.wait().unwrap();
}

/// A run long enough to be interrupted, its stderr kept.
fn long_run(dir: &Path) -> std::process::Child {
    common::ual()
        .args(["train", "--device", "cpu", "--set"])
        .arg(format!("output_dir={:?}", dir.display().to_string()))
        .args([
            "--set",
            "steps=100000",
            "--set",
            "eval_every=0",
            "--set",
            "checkpoint_every=0",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (at most 60 s) until `run` has logged `n` steps.
fn wait_for_steps(run: &Path, n: usize, child: &mut std::process::Child) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let logged =
            std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |m| m.lines().count());
        if logged >= n {
            return;
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(
            std::time::Instant::now() < deadline,
            "no step logged in 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The first SIGINT finishes the step, checkpoints it and exits 130 saying how to resume; the
/// checkpoint resumes. A second SIGINT exits at once.
#[test]
fn ctrl_c_checkpoints_then_a_second_stops_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("tiny-ual");
    let mut child = long_run(tmp.path());
    wait_for_steps(&run, 2, &mut child);
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("resume with `ual train --resume"),
        "{stderr}"
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("checkpoint/state.json")).unwrap())
            .unwrap();
    let step = state["step"].as_u64().unwrap() as usize;
    assert_eq!(
        losses(&run).len(),
        step,
        "the checkpoint is of the last logged step"
    );
    let out = common::ual()
        .args(["train", "--device", "cpu", "--resume"])
        .arg(&run)
        .args(["--set", &format!("steps={}", step + 1)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(losses(&run).len(), step + 1);

    let again = tempfile::tempdir().unwrap();
    let mut child = long_run(again.path());
    wait_for_steps(&again.path().join("tiny-ual"), 1, &mut child);
    let started = std::time::Instant::now();
    for _ in 0..2 {
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

/// Empty work is an error, not a success with made-up figures; a non-finite temperature is
/// refused by the argument parser.
#[test]
fn empty_or_impossible_work_does_not_report_success() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let out = common::ual()
        .args([
            "eval",
            "loss",
            "--model",
            "models/tiny",
            "--device",
            "cpu",
            "--data",
        ])
        .arg(&empty)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("no samples"),
        "{stderr}"
    );
    for value in ["NaN", "inf", "-1"] {
        let out = common::ual()
            .args(["generate", "--model", "models/tiny", "--prompt", "x"])
            // `=` so that clap reads "-1" as the value, not as a flag.
            .arg(format!("--temperature={value}"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("--temperature"),
            "{value}: {stderr}"
        );
    }
}

/// Training data that changed between a kill and `--resume` (cut short, or grown) is refused,
/// naming the file; `--allow-data-change` continues on it without a panic (once, data that
/// shrank indexed past its end).
#[test]
fn a_resume_on_changed_data_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("train.jsonl");
    let original = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny/data/train.jsonl"),
    )
    .unwrap();
    std::fs::write(&data, &original).unwrap();
    let data_set = format!("train_data={:?}", data.display().to_string());
    let (ok, stderr) = train(
        tmp.path(),
        &[
            &data_set,
            "steps=4",
            "checkpoint_every=2",
            "eval_every=0",
            "batch_size=16",
        ],
    );
    assert!(ok, "{stderr}");
    let run = tmp.path().join("tiny-ual");
    let lines: Vec<&str> = original.lines().collect();
    let resume = |extra: &[&str]| {
        let out = common::ual()
            .args(["train", "--device", "cpu", "--set", "steps=6", "--resume"])
            .arg(&run)
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for changed in [
        lines[..5].join("\n") + "\n",
        original.clone() + lines[0] + "\n",
    ] {
        std::fs::write(&data, &changed).unwrap();
        let (ok, stderr) = resume(&[]);
        assert!(!ok, "a changed file must be refused: {stderr}");
        assert!(
            stderr.contains("train.jsonl") && stderr.contains("--allow-data-change"),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    std::fs::write(&data, lines[..5].join("\n") + "\n").unwrap();
    let (ok, stderr) = resume(&["--allow-data-change"]);
    assert!(ok && !stderr.contains("panicked"), "{stderr}");
}

/// `generate --input` with a prompt longer than the model's 256 positions: by default it stops
/// naming the file and line; `--on-long-prompt skip` records the line as skipped and answers the
/// others; `truncate-left` answers it from its last tokens.
#[test]
fn a_prompt_too_long_for_the_model_is_named_or_handled_as_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("prompts.jsonl");
    let long = "word ".repeat(400);
    let lines = [
        r#"{"instruction":"Say hi.","output":"Hi."}"#.to_string(),
        serde_json::json!({ "instruction": long, "output": "ok" }).to_string(),
        r#"{"instruction":"Count to three.","output":"1 2 3"}"#.to_string(),
    ];
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let run = |policy: Option<&str>| {
        let mut command = common::ual();
        command
            .args([
                "generate",
                "--device",
                "cpu",
                "--max-new-tokens",
                "3",
                "--model",
            ])
            .arg(fixture_model("llama-gqa"))
            .arg("--input")
            .arg(&input);
        if let Some(p) = policy {
            command.args(["--on-long-prompt", p]);
        }
        let out = command.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, stderr) = run(None);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("prompts.jsonl") && stderr.contains("line 2"),
        "{stderr}"
    );
    for (policy, finish) in [("skip", Some("skipped")), ("truncate-left", None)] {
        let (ok, stdout, stderr) = run(Some(policy));
        assert!(ok, "{policy}: {stderr}");
        let answers: Vec<serde_json::Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            answers.len(),
            3,
            "{policy}: every line answered or recorded"
        );
        let second = answers[1]["finish"].as_str().unwrap();
        match finish {
            Some(f) => assert_eq!(second, f, "{policy}"),
            None => assert_ne!(second, "skipped", "{policy}"),
        }
    }
}

/// LoRA settings that cannot be meant are refused before any work: a rank above what a
/// projection holds (once still setting up after 60 s, silently), and α that is zero (training
/// with no effect), negative or not a number.
#[test]
fn lora_settings_that_cannot_be_meant_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, stderr) = train(tmp.path(), &["lora.r=100000", "steps=1"]);
    assert!(
        !ok && stderr.contains("lora.r = 100000") && stderr.contains("min(in, out)"),
        "{stderr}"
    );
    for alpha in ["0", "-16", "nan"] {
        let (ok, stderr) = train(tmp.path(), &[&format!("lora.alpha={alpha}"), "steps=1"]);
        assert!(!ok && stderr.contains("lora.alpha"), "{alpha}: {stderr}");
        assert!(
            stderr.contains("--set lora.alpha"),
            "blamed on --set: {stderr}"
        );
    }
}

/// Tokenising runs on every core and keeps the file's order: 3000 lines come back as 3000
/// samples, line by line (a 200 MB file once took 7 minutes on one thread).
#[test]
fn tokenising_in_parallel_keeps_the_files_order() {
    let p = Pretrained::load(&fixture_model("llama-gqa"), &burn::tensor::Device::flex()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("many.jsonl");
    let text: String = (0..3000)
        .map(|i| serde_json::json!({"instruction": format!("Add {i} and {}.", i % 7), "output": format!("{}", i + i % 7)}).to_string() + "\n")
        .collect();
    std::fs::write(&path, text).unwrap();
    let template = ual::data::template::Template::Alpaca;
    let (_, samples, _) = ual::data::batch::Prepare::new(&p.tokenizer, &template, 2, 64)
        .file(&path)
        .unwrap();
    assert_eq!(samples.len(), 3000);
    assert!(samples.iter().enumerate().all(|(i, s)| s.line == i + 1));
    let one = ual::data::batch::Prepare::new(&p.tokenizer, &template, 2, 64)
        .examples(&ual::data::formats::read_jsonl(&path).unwrap()[1234..1235])
        .unwrap()
        .0;
    assert_eq!(one[0].ids, samples[1234].ids, "each sample as it is alone");
}
