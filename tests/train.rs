//! Training: accumulation is exact, runs are reproducible, the loss goes down on every device,
//! and a run writes everything it promises.

mod common;

use std::collections::BTreeMap;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use common::{devices, fixture_model};
use ual::data::batch::{Overflow, Prepare, Sample};
use ual::data::formats::parse_line;
use ual::data::template::Template;
use ual::eval::score::token_logprobs;
use ual::loss::HeadPlan;
use ual::model::lora::{self, LoraConfig, for_each_named};
use ual::model::precision::{self, Frozen, Resolved};
use ual::model::{Llama, Pretrained};
use ual::train::replicas::StepTotals;
use ual::train::{Recompute, StepGradients, StepPlan, TrainConfig};

/// One device's step under `reduction`: the micro-batches' own divisor.
fn step_reduced(
    model: &Llama,
    micro: &[Vec<&Sample>],
    device: &Device,
    head: HeadPlan,
    recompute: Recompute,
    reduction: ual::data::batch::Reduction,
) -> anyhow::Result<StepGradients> {
    let plan = StepPlan {
        head,
        recompute,
        reduction,
    };
    let divisor = StepTotals::local(micro.iter().flatten().copied(), reduction).divisor;
    ual::train::step_gradients(model, micro, device, &plan, divisor)
}

/// [`step_reduced`] under ual's reduction: (gradients, loss, tokens).
fn step_gradients(
    model: &Llama,
    micro: &[Vec<&Sample>],
    device: &Device,
    head: HeadPlan,
    recompute: Recompute,
) -> anyhow::Result<(GradientsParams, f64, usize)> {
    let reduction = ual::data::batch::Reduction::Tokens;
    let step = step_reduced(model, micro, device, head, recompute, reduction)?;
    Ok((step.grads, step.loss, step.tokens))
}

fn tiny() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny")
}

/// Every gradient of the step, by parameter id, read back to the host.
fn grads_of(model: &Llama, grads: &GradientsParams) -> BTreeMap<String, Vec<f32>> {
    struct Collect<'a> {
        grads: &'a GradientsParams,
        out: BTreeMap<String, Vec<f32>>,
    }
    impl ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let values = g.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
                self.out.insert(param.id.to_string(), values);
            }
        }
    }
    let mut c = Collect {
        grads,
        out: BTreeMap::new(),
    };
    model.visit(&mut c);
    c.out
}

fn samples(p: &Pretrained) -> Vec<Sample> {
    let lines = [
        r#"{"instruction":"What is 2 + 3?","output":"2 + 3 = 5\n#### 5","uncertainty":1}"#,
        r#"{"instruction":"Write a haiku about rain.","output":"Soft rain on the roof, the garden drinks slowly, night smells of wet stone.","uncertainty":10}"#,
        r#"{"prompt":"The capital of France is","completion":" Paris."}"#,
        r#"{"instruction":"Name a colour.","input":"Something warm.","output":"Orange.","uncertainty":7}"#,
    ];
    let examples: Vec<_> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| parse_line(l, i + 1).unwrap())
        .collect();
    Prepare::new(&p.tokenizer, &Template::Alpaca, 2, 512)
        .examples(&examples)
        .unwrap()
        .0
}

/// The largest difference between two gradient sets, relative to each tensor's largest entry.
fn max_relative_gap(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for (id, ga) in a {
        let gb = &b[id];
        let scale = gb.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        for (x, y) in ga.iter().zip(gb) {
            worst = worst.max((x - y).abs() / scale);
        }
    }
    worst
}

/// ‖a − b‖ / ‖b‖ over every gradient entry together.
fn relative_l2(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> f64 {
    let (mut diff, mut norm) = (0f64, 0f64);
    for (id, gb) in b {
        for (x, y) in a[id].iter().zip(gb) {
            diff += (*x as f64 - *y as f64).powi(2);
            norm += (*y as f64).powi(2);
        }
    }
    (diff / norm).sqrt()
}

/// The fixture model with LoRA factors that are non-zero and the same on every device
/// (host-generated), so that both factors get gradient and devices can be compared.
fn lora_model(device: &Device) -> (Llama, Vec<Sample>) {
    let p = Pretrained::load(&fixture_model("llama-gqa"), device).unwrap();
    let samples = samples(&p);
    let mut model = lora::attach(
        p.model,
        &LoraConfig {
            r: 2,
            ..Default::default()
        },
        0,
        device,
    );
    for_each_named(&mut model, |_, proj| {
        if let Some(l) = proj.lora.as_mut() {
            for factor in [&mut l.a, &mut l.b] {
                let dims = factor.dims();
                let values: Vec<f32> = (0..dims[0] * dims[1])
                    .map(|i| ((i * 7919 + dims[1]) % 1000) as f32 / 1000.0 * 0.6 - 0.3)
                    .collect();
                let mut fresh =
                    Param::from_tensor(Tensor::from_data(TensorData::new(values, dims), device));
                fresh.id = factor.id;
                *factor = fresh;
            }
        }
    });
    (model, samples)
}

/// Gradients of one LoRA step on the fixture model, accumulated as 4 micro-batches of 1 (fused
/// head) and as one batch of 4 (unfused head), with the step's loss.
fn accumulated_both_ways(device: &Device) -> [(BTreeMap<String, Vec<f32>>, f64); 2] {
    let device = device.clone().autodiff();
    let (model, samples) = lora_model(&device);
    let all: Vec<&Sample> = samples.iter().collect();
    let one_each: Vec<Vec<&Sample>> = samples.iter().map(|s| vec![s]).collect();
    let fused = HeadPlan::fused(32000, usize::MAX);
    let off = Recompute::Off;
    let (g4, loss4, _) = step_gradients(&model, &one_each, &device, fused, off).unwrap();
    let unfused = HeadPlan::unfused(usize::MAX);
    let (g1, loss1, _) = step_gradients(&model, &[all], &device, unfused, off).unwrap();
    [
        (grads_of(&model, &g4), loss4),
        (grads_of(&model, &g1), loss1),
    ]
}

/// One LoRA step's gradients and loss on `device` with a checkpointing strategy and the head's
/// hidden gradient over `vocab_splits` slices of the vocabulary.
fn one_step(
    device: &Device,
    frozen: Option<burn::tensor::DType>,
    checkpointing: Recompute,
    vocab_splits: usize,
) -> (BTreeMap<String, Vec<f32>>, f64) {
    let device = checkpointing.autodiff_device(device);
    let (mut model, samples) = lora_model(&device);
    if let Some(dtype) = frozen {
        model = precision::prepare(
            model,
            Resolved {
                frozen: Frozen::Dense(dtype),
                ..Resolved::F32
            },
        );
    }
    let batch: Vec<&Sample> = samples.iter().collect();
    let hidden = model.config.hidden_size;
    let head = HeadPlan::fused(32000, usize::MAX).split_vocab(vocab_splits, hidden, 32000, false);
    let model = head.arrange(model);
    let (g, loss, _) = step_gradients(&model, &[batch], &device, head, checkpointing).unwrap();
    (grads_of(&model, &g), loss)
}

/// Gradient checkpointing recomputes what it dropped, so the gradients are the same: to 1e-5
/// of each tensor's largest entry for burn's op-level strategy (measured: bit-identical), and
/// to 5e-5 for layer recomputation, whose backward sums each layer's input gradient in its own
/// pass (measured 2.5e-5 on the CPU, spread evenly over all tensors: rounding, where a wrong
/// chain would be off by whole gradients). f16 frozen weights round weights and
/// projection inputs to 11 bits (and the product may accumulate in f16), so the gradients agree
/// to 5e-2 and the loss to 1e-3 relative. The head's hidden gradient over 16 vocabulary slices
/// (the loss kernel writing them slice-major) reorders sums only: 5e-5, as in full fine-tuning.
#[test]
fn memory_levers_keep_the_gradients() {
    for (name, device) in devices() {
        let (plain, plain_loss) = one_step(&device, None, Recompute::Off, 1);
        for (strategy, bound) in [(Recompute::Ops, 1e-5), (Recompute::Layers, 5e-5)] {
            let (ckpt, ckpt_loss) = one_step(&device, None, strategy, 1);
            let gap = max_relative_gap(&ckpt, &plain);
            eprintln!(
                "{name}: {strategy:?} checkpointing gap {gap:.2e}, loss {ckpt_loss} vs {plain_loss}"
            );
            assert!(
                gap <= bound,
                "{name}: {strategy:?}-checkpointed gradients differ by {gap}"
            );
            assert!(
                (ckpt_loss - plain_loss).abs() <= 1e-5 * plain_loss,
                "{name}: {strategy:?} loss {ckpt_loss} vs {plain_loss}"
            );
        }
        let (half, half_loss) =
            one_step(&device, Some(burn::tensor::DType::F16), Recompute::Off, 1);
        let gap = max_relative_gap(&half, &plain);
        eprintln!("{name}: f16 frozen weights gap {gap}, loss {half_loss}");
        assert!(
            gap <= 5e-2,
            "{name}: f16 frozen weights move gradients by {gap}"
        );
        assert!(
            (half_loss - plain_loss).abs() <= 1e-3 * plain_loss,
            "{name}: f16 loss {half_loss} vs {plain_loss}"
        );
        let (split, split_loss) = one_step(&device, None, Recompute::Off, 16);
        let gap = max_relative_gap(&split, &plain);
        eprintln!("{name}: vocabulary-split head gap {gap:.2e}, loss {split_loss}");
        assert!(gap <= 5e-5, "{name}: a split head moves gradients by {gap}");
        assert!(
            (split_loss - plain_loss).abs() <= 1e-5 * plain_loss,
            "{name}: split-head loss {split_loss} vs {plain_loss}"
        );
    }
}

/// One LoRA step's gradients and loss with the model computing in `dtype` (`precision`).
fn step_in(
    device: &Device,
    dtype: burn::tensor::DType,
    checkpointing: Recompute,
) -> (BTreeMap<String, Vec<f32>>, f64) {
    let device = checkpointing.autodiff_device(device);
    let (model, samples) = lora_model(&device);
    let model = precision::prepare(
        model,
        Resolved {
            frozen: Frozen::Dense(dtype),
            compute: dtype,
            ..Resolved::F32
        },
    );
    let batch: Vec<&Sample> = samples.iter().collect();
    let head = HeadPlan::fused(32000, usize::MAX);
    let (g, loss, _) = step_gradients(&model, &[batch], &device, head, checkpointing).unwrap();
    (grads_of(&model, &g), loss)
}

/// Layer recomputation in f16 replays the forward pass the step ran without it, the final norm
/// and the head included (both in f32 there), so the loss is the same to f32 rounding (1e-6
/// relative) and the gradients differ only by the backward's summation order, rounded to f16
/// where the decoder stores them: at most 4·u = 2e-3 of each tensor's largest entry (measured:
/// bit-identical on the CPU and lavapipe). Before, the recomputed final norm ran in f16 against
/// its f32 weight, and the step panicked.
#[test]
fn layer_checkpointing_keeps_the_half_precision_step() {
    use burn::tensor::DType;
    for (name, device) in devices() {
        let (plain, plain_loss) = step_in(&device, DType::F16, Recompute::Off);
        let (ckpt, ckpt_loss) = step_in(&device, DType::F16, Recompute::Layers);
        let gap = max_relative_gap(&ckpt, &plain) as f64;
        let loss_gap = (ckpt_loss - plain_loss).abs() / plain_loss;
        eprintln!("{name}: f16 layer checkpointing gap {gap:.2e}, loss gap {loss_gap:.2e}");
        assert!(loss_gap <= 1e-6, "{name}: loss {ckpt_loss} vs {plain_loss}");
        assert!(
            gap <= 4.0 * 2f64.powi(-11),
            "{name}: gradients move by {gap:.2e}"
        );
    }
}

/// Half precision against f32: f16 on the CPU and on the adapter, bf16 on the CPU (WGSL has
/// none).
///
/// The budget, derived: each value the decoder rounds to the half type carries a relative error
/// of at most u (f16: 2⁻¹¹ ≈ 4.9e-4, bf16: 2⁻⁸ ≈ 3.9e-3), and a LoRA factor's gradient depends
/// on some 50 of them in series in this 2-layer model (per layer: two norms' outputs, q, k, v,
/// the attention output, o, gate, up, their product, down and two residual sums, forward and
/// backward), with matmul sums accumulated in f32. Errors in series add at worst linearly, so
/// ≈ 50·u if the network passed them on unamplified; the budget is 64·u on the gradients'
/// relative L2 distance (f16 3.1e-2; measured 1.5e-2 on the CPU and on lavapipe), 128·u on any
/// one entry against its tensor's largest (measured 4.7e-2), and 10·u on the loss, which
/// is accumulated in f32 (measured 7e-5 to 8e-5).
///
/// The network does amplify: the fixture's attention is sharp (scores of tens), and a relative
/// error δ in q or k becomes an error of about |s|·δ in the probabilities. At f16 that stays in
/// the budget; at bf16's 8× coarser rounding it does not (measured 0.55 relative L2, 38× the
/// f16 figure, every op of the chain being within u of f32 on its own). So bf16 is held to what
/// it can promise here: the loss within 10·u, and gradients that still point the same way
/// (relative L2 below 0.75, where an unrelated gradient would be about 1.4).
#[test]
fn half_precision_keeps_the_gradients() {
    use burn::tensor::DType;
    for (name, device) in devices() {
        let (plain, plain_loss) = step_in(&device, DType::F32, Recompute::Off);
        let mut halves = vec![DType::F16];
        if !common::is_wgpu(&device) {
            halves.push(DType::BF16);
        }
        for dtype in halves {
            let (half, half_loss) = step_in(&device, dtype, Recompute::Off);
            let gap = max_relative_gap(&half, &plain) as f64;
            let l2 = relative_l2(&half, &plain);
            let loss_gap = (half_loss - plain_loss).abs() / plain_loss;
            eprintln!(
                "{name}: {dtype:?} gradient gap {gap:.2e} (max entry), {l2:.2e} (L2), loss gap {loss_gap:.2e}"
            );
            assert!(
                l2 > 0.0,
                "{name}: {dtype:?} changed nothing: did it run in f32?"
            );
            let (u, l2_bound, entry_bound) = match dtype {
                DType::F16 => (
                    2f64.powi(-11),
                    64.0 * 2f64.powi(-11),
                    128.0 * 2f64.powi(-11),
                ),
                _ => (2f64.powi(-8), 0.75, f64::INFINITY),
            };
            assert!(
                l2 <= l2_bound,
                "{name}: {dtype:?} gradients {l2:.2e} away (L2)"
            );
            assert!(
                gap <= entry_bound,
                "{name}: {dtype:?} moves an entry by {gap:.2e}"
            );
            assert!(
                loss_gap <= 10.0 * u,
                "{name}: {dtype:?} loss {half_loss} vs {plain_loss}"
            );
        }
    }
}

/// Layer checkpointing in full fine-tuning: every weight (the embedding tied to the head, the
/// norms, all projections) gets the gradient it gets without checkpointing, to 1e-5 of each
/// tensor's largest entry, over two micro-batches.
#[test]
fn layer_checkpointing_trains_every_weight() {
    for (name, device) in devices() {
        let device = device.autodiff();
        let p = Pretrained::load(&fixture_model("llama-tied-bf16"), &device).unwrap();
        let samples = samples(&p);
        let micro: Vec<Vec<&Sample>> = samples.chunks(2).map(|c| c.iter().collect()).collect();
        let head = HeadPlan::fused(32000, usize::MAX);
        let step = |strategy| step_gradients(&p.model, &micro, &device, head, strategy).unwrap();
        let (plain, plain_loss, _) = step(Recompute::Off);
        let (layers, layers_loss, _) = step(Recompute::Layers);
        let (plain, layers) = (grads_of(&p.model, &plain), grads_of(&p.model, &layers));
        // Embedding + final norm, and two norms and seven projections per layer.
        assert_eq!(
            layers.len(),
            2 + 9 * p.model.layers.len(),
            "{name}: a weight got no gradient"
        );
        let gap = max_relative_gap(&layers, &plain);
        eprintln!("{name}: full fine-tuning, layer checkpointing gap {gap:.2e}");
        assert!(gap <= 1e-5, "{name}: gradients differ by {gap}");
        assert!(
            (layers_loss - plain_loss).abs() <= 1e-5 * plain_loss,
            "{name}: loss {layers_loss} vs {plain_loss}"
        );
    }
}

/// The fused head's hidden gradient over vocabulary slices (split-K, the default on hardware
/// GPUs) with the untied head stored vocabulary-major, as training then stores it: in full
/// fine-tuning every weight, the head included, gets the gradient of the unsplit row-major head,
/// to 5e-5 of each tensor's largest entry: the slices only reorder sums of f32 products
/// (measured 7e-7 on the CPU; on lavapipe 5–8e-6 on every tensor and 1.9e-5 on one norm
/// weight, whose gradient sums over all tokens), where a wrong slice would be off by whole terms.
#[test]
fn vocabulary_split_head_trains_every_weight() {
    for (name, device) in devices() {
        let device = device.autodiff();
        let p = Pretrained::load(&fixture_model("llama-gqa"), &device).unwrap();
        let samples = samples(&p);
        let micro = [samples.iter().collect::<Vec<_>>()];
        let off = Recompute::Off;
        let whole = HeadPlan::fused(32000, usize::MAX);
        let sliced = whole.split_vocab(16, p.model.config.hidden_size, 32000, false);
        assert_eq!(sliced.blocks.vocab_splits, 16);
        let split_model = sliced.arrange(p.model.clone());
        let (plain, plain_loss, _) = step_gradients(&p.model, &micro, &device, whole, off).unwrap();
        let (split, split_loss, _) =
            step_gradients(&split_model, &micro, &device, sliced, off).unwrap();
        let (plain, split) = (grads_of(&p.model, &plain), grads_of(&split_model, &split));
        // Embedding, final norm and head, and two norms and seven projections per layer.
        assert_eq!(
            split.len(),
            3 + 9 * p.model.layers.len(),
            "{name}: a weight got no gradient"
        );
        let gap = max_relative_gap(&split, &plain);
        eprintln!("{name}: full fine-tuning, vocabulary-split head gap {gap:.2e}");
        assert!(gap <= 5e-5, "{name}: gradients differ by {gap}");
        assert!(
            (split_loss - plain_loss).abs() <= 1e-5 * plain_loss,
            "{name}: loss {split_loss} vs {plain_loss}"
        );
    }
}

#[test]
fn four_micro_batches_of_one_equal_one_batch_of_four() {
    let [(cpu4, cpu_loss4), (cpu1, cpu_loss1)] = accumulated_both_ways(&Device::flex());
    let [(gpu4, gpu_loss4), (gpu1, gpu_loss1)] = accumulated_both_ways(&common::wgpu_device());
    assert!(!cpu1.is_empty(), "LoRA factors receive gradients");
    for (name, a, b) in [
        ("cpu", cpu_loss4, cpu_loss1),
        ("wgpu", gpu_loss4, gpu_loss1),
    ] {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "{name}: loss {a} vs {b}"
        );
    }
    let cpu_gap = max_relative_gap(&cpu4, &cpu1);
    let gpu_gap = max_relative_gap(&gpu4, &gpu1);
    let device_gap = max_relative_gap(&gpu1, &cpu1);
    eprintln!(
        "accumulation gap: cpu {cpu_gap:.2e}, wgpu {gpu_gap:.2e}; wgpu vs cpu on one batch {device_gap:.2e}"
    );
    // 2e-5 relative to each tensor's largest gradient: the fused head (blocks of rows) and the
    // unfused one sum in different orders, and wgpu's autotune may pick other matmul kernels
    // from run to run (seen: 1.12e-5). A wrong normalisation would be off by a factor.
    assert!(cpu_gap <= 2e-5, "cpu: 4x1 vs 1x4 differ by {cpu_gap:.2e}");
    assert!(gpu_gap <= 2e-5, "wgpu: 4x1 vs 1x4 differ by {gpu_gap:.2e}");
}

fn quick_config(dir: &std::path::Path, device: &str, steps: usize) -> TrainConfig {
    quick_config_with(dir, device, steps, &[])
}

/// `config`'s run again in `dir/stopped`, stopped after step 2 (and checkpointed there), with
/// the uninterrupted run's later metrics lines appended as a crash may leave them: the run
/// directory and its first metrics as written.
fn stopped_after_step_2(
    config: &TrainConfig,
    dir: &std::path::Path,
) -> (std::path::PathBuf, String) {
    struct StopAfter(usize);
    impl ual::train::Reporter for StopAfter {
        fn stepped(&mut self, m: &ual::train::StepMetrics) {
            self.0 = m.step;
        }
        fn should_stop(&mut self) -> bool {
            self.0 >= 2
        }
    }
    let whole = config.run_dir().join("metrics.jsonl");
    let whole = std::fs::read_to_string(whole).unwrap();
    let mut stopped = config.clone();
    stopped.output_dir = dir.join("stopped");
    let err = ual::train::run_with(&stopped, ual::train::Start::Fresh, &mut StopAfter(0));
    assert!(err.is_err(), "the run stops after step 2");
    let run = stopped.run_dir();
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("checkpoint/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["step"], 2);
    let written = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let later: String = whole.lines().skip(2).map(|l| format!("{l}\n")).collect();
    std::fs::write(run.join("metrics.jsonl"), written.clone() + &later).unwrap();
    (run, written)
}

fn quick_config_with(
    dir: &std::path::Path,
    device: &str,
    steps: usize,
    extra: &[String],
) -> TrainConfig {
    TrainConfig::resolve(
        None,
        &[
            format!("model={:?}", tiny().display().to_string()),
            format!(
                "train_data={:?}",
                tiny().join("data/train.jsonl").display().to_string()
            ),
            format!(
                "eval_data={:?}",
                tiny().join("data/eval.jsonl").display().to_string()
            ),
            format!("output_dir={:?}", dir.display().to_string()),
            format!("device={device:?}"),
            format!("steps={steps}"),
            "batch_size=4".into(),
            "eval_every=0".into(),
            "checkpoint_every=0".into(),
            "optim.lr=0.01".into(),
            "optim.warmup_steps=1".into(),
        ]
        .into_iter()
        .chain(extra.iter().cloned())
        .collect::<Vec<_>>(),
    )
    .unwrap()
}

#[test]
fn training_lowers_the_loss_on_every_device() {
    for (device_name, device) in devices() {
        let spec = if device_name == "wgpu" {
            common::wgpu_spec()
        } else {
            "cpu"
        };
        drop(device);
        let tmp = tempfile::tempdir().unwrap();
        // UAL-LoRA steps on one batch holding the whole held-out set: its loss must fall.
        let eval = tiny().join("data/eval.jsonl").display().to_string();
        let extra = [
            format!("train_data={eval:?}"),
            "batch_size=64".into(),
            "max_seq_len=64".into(),
        ];
        let summary =
            ual::train::run(&quick_config_with(tmp.path(), spec, 4, &extra), false).unwrap();
        let (before, after) = (
            summary.initial_eval_loss.unwrap(),
            summary.final_eval_loss.unwrap(),
        );
        eprintln!("{device_name}: loss {before:.4} -> {after:.4}");
        assert!(after < before - 0.02, "{device_name}: {before} -> {after}");
    }
}

#[test]
fn a_run_writes_its_artifacts_and_repeats_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = quick_config(tmp.path(), "cpu", 3);
    let first = ual::train::run(&config, false).unwrap();
    let run = tmp.path().join("tiny-ual");
    for f in [
        "config.toml",
        "metrics.jsonl",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "loss.svg",
        "summary.json",
    ] {
        assert!(run.join(f).is_file(), "missing {f}");
    }
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3);
    config.name = "again".into();
    let second = ual::train::run(&config, false).unwrap();
    assert_eq!(
        first.first_loss, second.first_loss,
        "fixed seed, same losses"
    );
    assert_eq!(first.last_loss, second.last_loss);
    // The exported adapter loads back onto the base model.
    Pretrained::load_with_adapter(&tiny(), Some(&run.join("adapter")), &Device::flex()).unwrap();
}

#[test]
fn bad_training_data_names_file_line_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("bad.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\":\"a\",\"completion\":\"b\"}\n{\"instruction\":\"x\"}\n",
    )
    .unwrap();
    let mut config = quick_config(tmp.path(), "cpu", 1);
    config.train_data = data.clone();
    let msg = format!("{:#}", ual::train::run(&config, false).unwrap_err());
    assert!(
        msg.contains("bad.jsonl:2") && msg.contains("`output`"),
        "{msg}"
    );

    std::fs::write(
        &data,
        "{\"prompt\":\"a\",\"completion\":\"b\",\"uncertainty\":\"high\"}\n",
    )
    .unwrap();
    let msg = format!("{:#}", ual::train::run(&config, false).unwrap_err());
    assert!(
        msg.contains("bad.jsonl:1") && msg.contains("`uncertainty`"),
        "{msg}"
    );
    // A run refused before its first step leaves no run directory behind.
    assert!(!config.run_dir().exists(), "{}", config.run_dir().display());
}

/// The losses of `metrics.jsonl`, by step.
fn losses(run: &std::path::Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn resume_reproduces_the_uninterrupted_run() {
    let wgpu = common::wgpu_spec();
    for (device, mode, extra) in [
        ("cpu", "lora", "lora.dropout=0.1"),
        ("cpu", "full", "optim.weight_decay=0.01"),
        // Without dropout on wgpu: seeding its RNG per step did not reproduce the masks across
        // processes (seen once at 5e-3 relative); the CPU case covers resumed dropout.
        (wgpu, "lora", "lora.dropout=0.0"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let extra = [
            format!("mode={mode:?}"),
            extra.to_string(),
            "checkpoint_every=2".into(),
            "grad_accum=2".into(),
        ];
        let mut config = quick_config_with(tmp.path(), device, 4, &extra);
        config.eval_data = None; // held-out loss plays no part in resuming; skip its cost
        let full = ual::train::run(&config, false).unwrap();
        let uninterrupted = losses(std::path::Path::new(&full.run_dir));
        assert_eq!(uninterrupted.len(), 4);

        // The checkpoint of step 2 is what a run killed during step 3 or later leaves behind.
        // A crashed run may also have logged steps past it; resume must drop them.
        let (run, written) = stopped_after_step_2(&config, tmp.path());
        let kept: Vec<&str> = written.lines().take(2).collect();
        let args = ["train", "--device", device, "--resume"];
        let out = common::ual().args(args).arg(&run).output().unwrap();
        assert!(
            out.status.success(),
            "{device} {mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let resumed = losses(&run);
        assert_eq!(
            resumed.len(),
            4,
            "{device} {mode}: steps 1-2 kept, 3-4 redone"
        );
        // The kept lines are the very bytes the uninterrupted run wrote, never re-serialised
        // (once, their last digits changed).
        let rewritten = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        let first_two: Vec<&str> = rewritten.lines().take(2).collect();
        assert_eq!(first_two, kept, "{device} {mode}: steps 1-2 byte for byte");
        for ((s1, a), (s2, b)) in uninterrupted.iter().zip(&resumed) {
            assert_eq!(s1, s2);
            // The CPU repeats its operations exactly: bit-identical. A new wgpu process may
            // autotune other kernels, whose f32 sums round differently: 1e-5 relative there.
            let tolerance = if device == "cpu" { 0.0 } else { 1e-5 * b.abs() };
            assert!(
                (a - b).abs() <= tolerance,
                "{device} {mode} step {s1}: uninterrupted {a}, resumed {b}"
            );
        }
    }
}

#[test]
fn full_fine_tuning_writes_a_model_that_reloads() {
    let tmp = tempfile::tempdir().unwrap();
    // Four full steps on the held-out set itself, one batch: its loss must fall.
    let eval = tiny().join("data/eval.jsonl").display().to_string();
    let extra = [
        "mode=\"full\"".into(),
        format!("train_data={eval:?}"),
        "batch_size=64".into(),
        "optim.lr=1e-3".into(),
    ];
    let summary = ual::train::run(&quick_config_with(tmp.path(), "cpu", 4, &extra), false).unwrap();
    let (before, after) = (
        summary.initial_eval_loss.unwrap(),
        summary.final_eval_loss.unwrap(),
    );
    assert!(
        after < before - 0.05,
        "full fine-tuning lowers the loss: {before} -> {after}"
    );
    let model_dir = std::path::Path::new(&summary.run_dir).join("model");
    let exported = Pretrained::load(&model_dir, &Device::flex()).unwrap();
    let base = Pretrained::load(&tiny(), &Device::flex()).unwrap();
    let ids = base
        .tokenizer
        .encode("Natalia sold clips to 48 of her friends.")
        .unwrap();
    let (a, b) = (
        token_logprobs(&exported.model, &ids),
        token_logprobs(&base.model, &ids),
    );
    let moved = a
        .iter()
        .zip(&b)
        .skip(1)
        .map(|(x, y)| (x.unwrap() - y.unwrap()).abs())
        .fold(0f32, f32::max);
    assert!(
        moved > 1e-3,
        "the exported weights are the trained ones, not the base's"
    );
    assert!(
        !std::path::Path::new(&summary.run_dir)
            .join("adapter")
            .exists()
    );
}

#[test]
fn over_long_samples_are_truncated_or_dropped_and_counted() {
    let p = Pretrained::load(&fixture_model("llama-gqa"), &Device::flex()).unwrap();
    let lines = [
        r#"{"instruction":"Say hi.","output":"Hi."}"#.to_string(),
        format!(
            r#"{{"prompt":"Count:","completion":"{}"}}"#,
            " one two three four five six seven eight nine ten".repeat(8)
        ),
    ];
    let examples: Vec<_> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| parse_line(l, i + 1).unwrap())
        .collect();
    let tokenized = |max, overflow| {
        {
            let mut prepare = Prepare::new(&p.tokenizer, &Template::Alpaca, 2, max);
            prepare.rules.overflow = overflow;
            prepare.examples(&examples)
        }
        .unwrap()
    };
    let (all, summary) = tokenized(512, Overflow::Truncate);
    assert_eq!((summary.truncated, summary.dropped), (0, 0));
    let long = all[1].ids.len();
    assert!(
        long > all[0].ids.len() + 4,
        "only the second sample exceeds the window below"
    );
    let (cut, summary) = tokenized(long - 4, Overflow::Truncate);
    assert_eq!(
        (summary.samples, summary.truncated, summary.dropped),
        (2, 1, 0)
    );
    assert_eq!(cut[1].ids.len(), long - 4);
    assert_eq!(
        cut[1].ids[..],
        all[1].ids[..long - 4],
        "the response end is cut"
    );
    let (kept, summary) = tokenized(long - 4, Overflow::Drop);
    assert_eq!(
        (summary.samples, summary.truncated, summary.dropped),
        (1, 0, 1)
    );
    assert_eq!(kept[0], all[0]);
    // A window the prompt fills leaves nothing to learn: dropped even when truncating.
    let (_, summary) = tokenized(3, Overflow::Truncate);
    assert_eq!(summary.dropped, 2);
}

/// Under `reduction = "samples"` (the authors' per-sample mean) accumulation is exact too: 4
/// micro-batches of 1 sample give the gradient of one batch of 4, and the step's loss is the
/// mean of each sample's own loss (`score_recipe`, which divides by the sample's labelled
/// tokens). Samples of different lengths make a token-weighted mean differ.
#[test]
fn samples_reduction_accumulates_exactly() {
    use ual::data::batch::Reduction;
    for (name, device) in devices() {
        let device = device.autodiff();
        let (model, samples) = lora_model(&device);
        let all: Vec<&Sample> = samples.iter().collect();
        let one_each: Vec<Vec<&Sample>> = samples.iter().map(|s| vec![s]).collect();
        let off = Recompute::Off;
        let samples_mode = Reduction::Samples;
        let fused = HeadPlan::fused(32000, usize::MAX);
        let unfused = HeadPlan::unfused(usize::MAX);
        let StepGradients {
            grads: g4,
            loss: loss4,
            ..
        } = step_reduced(&model, &one_each, &device, fused, off, samples_mode).unwrap();
        let StepGradients {
            grads: g1,
            loss: loss1,
            ..
        } = step_reduced(
            &model,
            std::slice::from_ref(&all),
            &device,
            unfused,
            off,
            samples_mode,
        )
        .unwrap();
        let (_, token_loss, _) = step_gradients(&model, &[all], &device, unfused, off).unwrap();
        let per_sample: f64 = samples
            .iter()
            .enumerate()
            .map(|(i, s)| {
                ual::eval::score::score_recipe(&model.valid(), s, i, samples_mode)
                    .unwrap()
                    .loss
            })
            .sum::<f64>()
            / samples.len() as f64;
        for (what, a) in [("4 x 1", loss4), ("1 x 4", loss1)] {
            assert!(
                (a - per_sample).abs() <= 1e-5 * per_sample.abs(),
                "{name} {what}: loss {a} vs mean of per-sample losses {per_sample}"
            );
        }
        assert!(
            (token_loss - per_sample).abs() > 1e-3,
            "{name}: the token-weighted mean must differ ({token_loss} vs {per_sample})"
        );
        let gap = max_relative_gap(&grads_of(&model, &g4), &grads_of(&model, &g1));
        // As the token-weighted test: 2e-5 of each tensor's largest gradient.
        assert!(gap <= 2e-5, "{name}: 4x1 vs 1x4 differ by {gap:.2e}");
    }
}

/// The step's reported NLL is its loss with every ε set to 0, on both heads and under both
/// reductions (relative tolerance 1e-5: f32 sums in different orders).
#[test]
fn the_reported_nll_is_the_loss_without_smoothing() {
    use ual::data::batch::Reduction;
    for (name, device) in devices() {
        let device = device.autodiff();
        let (model, samples) = lora_model(&device);
        assert!(
            samples.iter().any(|s| s.smoothing > 0.0),
            "some sample is smoothed"
        );
        let plain: Vec<Sample> = samples
            .iter()
            .map(|s| Sample {
                smoothing: 0.0,
                ..s.clone()
            })
            .collect();
        let off = Recompute::Off;
        for head in [
            HeadPlan::fused(32000, usize::MAX),
            HeadPlan::unfused(usize::MAX),
        ] {
            for reduction in [Reduction::Tokens, Reduction::Samples] {
                let step = |samples: &[Sample]| {
                    let micro = vec![samples.iter().collect::<Vec<_>>()];
                    step_reduced(&model, &micro, &device, head, off, reduction).unwrap()
                };
                let (smoothed, unsmoothed) = (step(&samples), step(&plain));
                assert!(
                    (smoothed.nll - unsmoothed.loss).abs() <= 1e-5 * unsmoothed.loss.abs(),
                    "{name} {head:?} {reduction:?}: nll {} vs ε = 0 loss {}",
                    smoothed.nll,
                    unsmoothed.loss
                );
                assert!(
                    (unsmoothed.nll - unsmoothed.loss).abs() <= 1e-6 * unsmoothed.loss.abs(),
                    "{name}: with ε = 0 the nll is the loss"
                );
                assert!(
                    (smoothed.loss - smoothed.nll).abs() > 1e-4,
                    "{name}: smoothing changes the loss"
                );
            }
        }
    }
}

/// QLoRA end to end: the bundled model trains on a Q4_0 base (its held-out loss falls), the
/// run records the base type, `--resume` keeps it and redoes steps 3–4 as the uninterrupted
/// run did, and a resume that asks for another base type is refused.
#[test]
fn a_q4_0_base_trains_and_resumes_with_its_base_type() {
    let wgpu = common::wgpu_spec();
    for device in ["cpu", wgpu] {
        let tmp = tempfile::tempdir().unwrap();
        let extra = [
            "base_dtype=\"q4_0\"".to_string(),
            "checkpoint_every=2".into(),
            "optim.lr=0.003".into(),
        ];
        let config = quick_config_with(tmp.path(), device, 4, &extra);
        let summary = ual::train::run(&config, false).unwrap();
        let (before, after) = (
            summary.initial_eval_loss.unwrap(),
            summary.final_eval_loss.unwrap(),
        );
        assert!(
            after < before,
            "{device}: q4_0 LoRA lowers the held-out loss: {before} -> {after}"
        );
        let run = std::path::PathBuf::from(&summary.run_dir);
        let written = std::fs::read_to_string(run.join("config.toml")).unwrap();
        assert!(written.contains("base_dtype = \"q4_0\""), "{written}");
        let uninterrupted = losses(&run);

        let (run, _) = stopped_after_step_2(&config, tmp.path());
        let run_arg = run.to_str().unwrap();
        let err = common::ual_err(&[
            "train",
            "--device",
            device,
            "--base-dtype",
            "f32",
            "--resume",
            run_arg,
        ]);
        assert!(err.contains("base_dtype"), "{device}: {err}");
        common::ual_run(&["train", "--device", device, "--resume", run_arg]);
        let resumed = losses(&run);
        assert_eq!(resumed.len(), 4, "{device}");
        for ((s1, a), (_, b)) in uninterrupted.iter().zip(&resumed) {
            let tolerance = if device == "cpu" { 0.0 } else { 1e-5 * b.abs() };
            assert!(
                (a - b).abs() <= tolerance,
                "{device} step {s1}: {a} vs resumed {b}"
            );
        }
    }
}

/// A finished run's last step is checkpointed, so `--resume --set steps=M` extends it: steps
/// 1..N stay byte for byte as they were and the run goes on from step N, saying so.
#[test]
fn a_finished_run_extends_from_its_last_step() {
    let tmp = tempfile::tempdir().unwrap();
    // Checkpoints every 10 steps: the last step (2) is checkpointed all the same.
    let mut config = quick_config_with(tmp.path(), "cpu", 2, &["checkpoint_every=10".into()]);
    config.eval_data = None;
    let summary = ual::train::run(&config, false).unwrap();
    let run = std::path::PathBuf::from(&summary.run_dir);
    let before = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let out = common::ual()
        .args(["train", "--device", "cpu", "--set", "steps=4", "--resume"])
        .arg(&run)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("resuming from step 2 of 4"), "{said}");
    let after = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(after.lines().count(), 4);
    assert!(after.starts_with(&before), "steps 1-2 byte for byte");
}

/// `early_stop_patience` stops the run once the held-out NLL has not gone lower for that many
/// evaluations, `best/` holds the adapter of the best one, and the count travels in the
/// checkpoint: a resume stops where it stopped, and a resume with patience 0 goes on.
#[test]
fn early_stopping_keeps_the_best_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    // A rate so small that no weight moves in f32: every evaluation ties the first.
    let extra = [
        "eval_every=2",
        "early_stop_patience=2",
        "optim.lr=1e-30",
        "checkpoint_every=10",
    ]
    .map(String::from);
    let config = quick_config_with(tmp.path(), "cpu", 20, &extra);
    let summary = ual::train::run(&config, false).unwrap();
    assert!(summary.stopped_early);
    assert_eq!((summary.steps, summary.best_step), (6, Some(2)));
    let run = config.run_dir();
    assert!(run.join("best/adapter/adapter_model.safetensors").exists());
    assert!(run.join("best/adapter/adapter_config.json").exists());
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 6);
    let events = std::fs::read(run.join("events.out.tfevents.ual")).unwrap();
    assert!(
        events.windows(8).any(|w| w == b"eval/nll"),
        "TensorBoard gets the held-out NLL"
    );

    let again = ual::train::run(&TrainConfig::for_resume(&run, &[]).unwrap(), true).unwrap();
    assert!(again.stopped_early);
    assert_eq!((again.steps, again.best_step), (6, Some(2)));
    let on = TrainConfig::for_resume(&run, &["early_stop_patience=0".into(), "steps=8".into()]);
    let extended = ual::train::run(&on.unwrap(), true).unwrap();
    assert!(!extended.stopped_early);
    assert_eq!(extended.steps, 8);
    let after = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(after.starts_with(&metrics), "steps 1-6 byte for byte");
}

/// `init_adapter` starts from a trained adapter: the new run's held-out NLL before its first
/// step is the old run's last. An adapter of another rank is refused, naming the key.
#[test]
fn a_run_starts_from_an_existing_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let first = quick_config(&tmp.path().join("a"), "cpu", 2);
    let trained = ual::train::run(&first, false).unwrap();
    let adapter = first.run_dir().join("adapter");
    let from = format!("init_adapter={:?}", adapter.display().to_string());
    let second = quick_config_with(&tmp.path().join("b"), "cpu", 1, std::slice::from_ref(&from));
    let continued = ual::train::run(&second, false).unwrap();
    assert_eq!(continued.initial_eval_nll, trained.final_eval_nll);
    assert_ne!(continued.initial_eval_nll, trained.initial_eval_nll);
    let other_rank = quick_config_with(&tmp.path().join("c"), "cpu", 1, &[from, "lora.r=4".into()]);
    let err = ual::train::run(&other_rank, false).unwrap_err();
    assert!(format!("{err:#}").contains("lora.r is 4"), "{err:#}");
}
