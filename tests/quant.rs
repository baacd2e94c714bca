//! Quantized bases (Q8_0 / Q4_0) against references nobody here wrote: gguf-py's quantizer
//! (llama.cpp's rounding) byte for byte, and transformers on the same model with every
//! projection replaced by gguf-py's quantize → dequantize round trip.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Param;
use burn::tensor::{DType, Device, Tensor, TensorData};
use common::{devices, fixture_model, fixtures};
use serde::Deserialize;
use ual::data::batch::Sample;
use ual::eval::score::token_logprobs;
use ual::model::Pretrained;
use ual::model::load::{SafetensorsFile, Weights, load_llama};
use ual::model::lora::{self, LoraConfig, Weight, for_each_named};
use ual::model::precision::{BaseDtype, Dtypes, Precision, Resolved};
use ual::ops::quant::{self, BLOCK, Block, BlockFormat, PackedWeight, blocks};

const FORMATS: [(BlockFormat, &str); 2] =
    [(BlockFormat::Q8_0, "q8_0"), (BlockFormat::Q4_0, "q4_0")];

/// Absolute tolerance on log-probs (nats), as for every model test.
const LOGPROB_ATOL: f64 = 2e-4;

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn quant_fixture() -> (Vec<f32>, usize, usize) {
    let dir = fixtures().join("quant");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    let rows = meta["rows"].as_u64().unwrap() as usize;
    let cols = meta["cols"].as_u64().unwrap() as usize;
    (read_f32(&dir.join("input.f32")), rows, cols)
}

/// Ties of both roundings, all-zero blocks, one huge value per block, subnormal f16 scales and
/// a wide spread of magnitudes (scripts/make_quant_fixtures.py): every byte as gguf-py writes it.
#[test]
fn blocks_equal_gguf_py_byte_for_byte() {
    let (input, _, cols) = quant_fixture();
    for (format, name) in FORMATS {
        let expected = std::fs::read(fixtures().join(format!("quant/{name}.bin"))).unwrap();
        let ours = blocks::to_bytes(format, &blocks::quantize_rows(format, &input, cols));
        assert_eq!(ours.len(), expected.len(), "{name}: length");
        let bb = format.block_bytes();
        for (i, (a, b)) in ours.chunks(bb).zip(expected.chunks(bb)).enumerate() {
            assert_eq!(
                a,
                b,
                "{name}: block {i} (row {}) differs",
                i / (cols / BLOCK)
            );
        }
    }
}

/// The device's dequantization of gguf-py's blocks equals gguf-py's `dequantize`, bit for bit,
/// with f32 and f16 scales, on the CPU and wgpu.
#[test]
fn device_dequantization_is_bit_exact() {
    let (_, rows, cols) = quant_fixture();
    for (device_name, device) in devices() {
        for (format, name) in FORMATS {
            let bytes = std::fs::read(fixtures().join(format!("quant/{name}.bin"))).unwrap();
            let parsed: Vec<Block> = bytes
                .chunks(format.block_bytes())
                .map(|b| Block::from_bytes(format, b))
                .collect();
            let expected = read_f32(&fixtures().join(format!("quant/{name}.dequantized.f32")));
            let host: Vec<f32> = parsed.iter().flat_map(|b| b.dequantize()).collect();
            assert_eq!(bits(&host), bits(&expected), "{name}: host dequantization");
            for scales in [DType::F32, DType::F16] {
                let packed = PackedWeight::new(format, &parsed, [rows, cols], scales, &device);
                let ours = quant::dequantize(&packed)
                    .into_data()
                    .try_to_vec::<f32>()
                    .unwrap();
                assert_eq!(
                    bits(&ours),
                    bits(&expected),
                    "{name} on {device_name} with {scales:?} scales"
                );
            }
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[derive(Deserialize)]
struct Expected {
    texts: Vec<ExpectedText>,
}

#[derive(Deserialize)]
struct ExpectedText {
    text: String,
    logprobs: Vec<Option<f64>>,
}

fn packed(types: Dtypes, device: &Device) -> Resolved {
    let _ = device;
    let cpu = ual::device::DeviceTypes {
        is_wgpu: common::is_wgpu(device),
        shader_f16: true,
        bf16_arithmetic: false,
    };
    types.resolve(cpu).unwrap()
}

/// The model scored with a quantized base equals transformers holding the round-tripped
/// weights: the quantization is llama.cpp's and nothing else moves.
#[test]
fn quantized_base_scores_as_transformers_with_round_tripped_weights() {
    let dir = fixture_model("llama-q32");
    for (device_name, device) in devices() {
        for (format, name) in FORMATS {
            let base = if format == BlockFormat::Q8_0 {
                BaseDtype::Q8_0
            } else {
                BaseDtype::Q4_0
            };
            let types = packed(
                Dtypes {
                    base,
                    precision: Precision::F32,
                },
                &device,
            );
            let pretrained = Pretrained::load_as(&dir, &device, types).unwrap();
            let kinds: Vec<bool> = pretrained
                .model
                .projections()
                .map(|(_, p)| matches!(p.weight, Weight::Packed(_)))
                .collect();
            assert!(
                kinds.iter().all(|&k| k),
                "{name}: every projection is packed"
            );
            let text = std::fs::read_to_string(dir.join(format!("expected.{name}.json"))).unwrap();
            let expected: Expected = serde_json::from_str(&text).unwrap();
            let mut worst = 0f64;
            for case in expected.texts {
                let ids = pretrained.tokenizer.encode(&case.text).unwrap();
                let ours = token_logprobs(&pretrained.model, &ids);
                for (j, (a, b)) in ours.iter().zip(&case.logprobs).enumerate().skip(1) {
                    let (a, b) = (a.unwrap() as f64, b.unwrap());
                    worst = worst.max((a - b).abs());
                    assert!(
                        (a - b).abs() <= LOGPROB_ATOL,
                        "{name} on {device_name}, {:?} token {j}: ours {a}, transformers {b}",
                        case.text
                    );
                }
            }
            eprintln!("{name} on {device_name}: max |Δlogprob| = {worst:.2e}");
        }
    }
}

/// A checkpoint whose projections come back from the round trip: the f32 model a quantized
/// base stands for.
struct RoundTripped<'a> {
    checkpoint: &'a SafetensorsFile,
    format: BlockFormat,
}

impl Weights for RoundTripped<'_> {
    fn read(&self, name: &str, shape: &[usize]) -> anyhow::Result<Vec<f32>> {
        let values = self.checkpoint.read(name, shape)?;
        if !name.contains("_proj.") {
            return Ok(values);
        }
        let blocks = blocks::quantize_rows(self.format, &values, shape[1]);
        Ok(blocks.iter().flat_map(|b| b.dequantize()).collect())
    }
}

fn lora_on(model: ual::model::Llama, device: &Device) -> ual::model::Llama {
    let mut model = lora::attach(model, &LoraConfig::default(), 0, device);
    // Non-zero B, so that both factors get gradient.
    for_each_named(&mut model, |_, proj| {
        if let Some(l) = proj.lora.as_mut() {
            let dims = l.b.dims();
            let values: Vec<f32> = (0..dims[0] * dims[1])
                .map(|i| ((i * 7919 + 13) % 1000) as f32 / 1000.0 * 0.2 - 0.1)
                .collect();
            let mut fresh =
                Param::from_tensor(Tensor::from_data(TensorData::new(values, dims), device));
            fresh.id = l.b.id;
            l.b = fresh;
        }
    });
    model
}

fn lora_grads(
    model: &ual::model::Llama,
    samples: &[Sample],
    device: &Device,
) -> (BTreeMap<String, Vec<f32>>, f64) {
    use ual::data::batch::Reduction;
    use ual::loss::HeadPlan;
    use ual::train::{Recompute, StepPlan, step_gradients};
    let batch: Vec<&Sample> = samples.iter().collect();
    let plan = StepPlan {
        head: HeadPlan::fused(32000, usize::MAX),
        recompute: Recompute::Off,
        reduction: Reduction::Tokens,
    };
    let tokens = samples.iter().map(|s| s.share(Reduction::Tokens)).sum();
    let step = step_gradients(model, &[batch], device, &plan, tokens).unwrap();
    let (grads, loss) = (step.grads, step.loss);
    let mut out = BTreeMap::new();
    for (name, proj) in model.projections() {
        if let Some(l) = &proj.lora {
            for (key, p) in [("A", &l.a), ("B", &l.b)] {
                let g = grads.get::<2>(p.id).expect("a LoRA gradient");
                let values = g.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
                out.insert(format!("{name}.{key}"), values);
            }
        }
    }
    (out, loss)
}

/// One LoRA step on a Q8_0 base gives the gradients of the same step on an f32 model holding
/// the round-tripped weights. The weights are the same numbers, so only the order of the
/// projections' sums may differ (Wᵀ is read transposed from the packed layout): f32 rounding,
/// u·√(in) ≈ 1e-6 relative per product, compounded over two layers. Bound: 1e-5 of each
/// tensor's largest entry (a gradient taken against the wrong weight is off by whole units),
/// and the loss to 1e-6 relative.
#[test]
fn a_q8_0_step_has_the_gradients_of_the_round_tripped_model() {
    let dir = fixture_model("llama-q32");
    let checkpoint = SafetensorsFile::open(&dir).unwrap();
    let config = ual::model::ModelConfig::from_file(&dir.join("config.json")).unwrap();
    for (device_name, device) in devices() {
        let device = device.autodiff();
        let plain = Pretrained::load(&dir, &device).unwrap();
        let samples = samples(&plain);
        let types = packed(
            Dtypes {
                base: BaseDtype::Q8_0,
                precision: Precision::F32,
            },
            &device,
        );
        let q8 = load_llama(&config, &checkpoint, &device, types).unwrap();
        let embedding = q8.embed_tokens.weight.val().dtype();
        assert_eq!(
            embedding,
            DType::F16,
            "{device_name}: the f16 embedding stays f16"
        );
        let round = RoundTripped {
            checkpoint: &checkpoint,
            format: BlockFormat::Q8_0,
        };
        let reference = load_llama(&config, &round, &device, Resolved::F32).unwrap();
        let (ours, ours_loss) = lora_grads(&lora_on(q8, &device), &samples, &device);
        let (theirs, their_loss) = lora_grads(&lora_on(reference, &device), &samples, &device);
        assert!(
            (ours_loss - their_loss).abs() <= 1e-6 * their_loss.abs(),
            "{device_name}: loss {ours_loss} vs {their_loss}"
        );
        let mut worst = 0f64;
        for (name, g) in &theirs {
            let o = &ours[name];
            let scale = g.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            assert!(scale > 0.0, "{device_name}: {name} has no gradient");
            assert!(
                o.iter().all(|v| v.is_finite()),
                "{device_name}: {name} is not finite"
            );
            let gap = o
                .iter()
                .zip(g)
                .fold(0f64, |m, (a, b)| m.max((a - b).abs() as f64))
                / scale;
            worst = worst.max(gap);
            assert!(
                gap <= 1e-5,
                "{device_name}: {name} differs by {gap:.2e} of its largest entry"
            );
        }
        eprintln!("{device_name}: q8_0 vs round-tripped f32, worst gradient gap {worst:.2e}");
    }
}

/// Under a quantized base an f16 checkpoint's embedding and head stay f16 (half a 7B model's
/// 1 GB of them in f32), and nothing moves: each product widens them to the f32 they were read
/// as, so the logits equal those of the same model holding them in f32, bit for bit, for a
/// tied head (llama-q32) and an untied one (mistral-f16).
#[test]
fn an_f16_checkpoints_embedding_and_head_stay_f16_and_score_the_same() {
    let device = Device::flex();
    for name in ["llama-q32", "mistral-f16"] {
        let dir = fixture_model(name);
        let types = packed(
            Dtypes {
                base: BaseDtype::Q4_0,
                precision: Precision::F32,
            },
            &device,
        );
        let kept = Pretrained::load_as(&dir, &device, types).unwrap().model;
        let widened = Resolved {
            kept_halves: &[],
            ..types
        };
        let plain = Pretrained::load_as(&dir, &device, widened).unwrap().model;
        assert_eq!(kept.embed_tokens.weight.val().dtype(), DType::F16, "{name}");
        assert_eq!(
            plain.embed_tokens.weight.val().dtype(),
            DType::F32,
            "{name}"
        );
        if let Some(head) = &kept.lm_head {
            assert_eq!(head.weight.val().dtype(), DType::F16, "{name}: the head");
        }
        let ids = Tensor::<2, burn::tensor::Int>::from_data(
            TensorData::new(vec![1i64, 5, 9, 13, 2, 7], [2, 3]),
            &device,
        );
        let logits = |m: &ual::model::Llama| {
            let values = m.forward(ids.clone()).into_data();
            values.convert::<f32>().try_to_vec::<f32>().unwrap()
        };
        assert_eq!(logits(&kept), logits(&plain), "{name}: the logits moved");
        // Decoding widens the head once, not on every token, and nothing moves either.
        let decoding = kept.with_f32_head();
        let head_dtype = decoding.head_weight().unwrap().dtype();
        assert_eq!(head_dtype, DType::F32, "{name}: the decoding head");
        assert_eq!(logits(&decoding), logits(&plain), "{name}: decoding moved");
        // The fused loss reads the head as stored, and widens it a slice at a time.
        assert_eq!(kept.head_weight().unwrap().dtype(), DType::F16, "{name}");
        let head = |m: &ual::model::Llama| {
            let values = m.head_weight().unwrap().cast(DType::F32).into_data();
            values.try_to_vec::<f32>().unwrap()
        };
        assert_eq!(head(&kept), head(&plain), "{name}: the head moved");
    }
}

fn samples(p: &Pretrained) -> Vec<Sample> {
    use ual::data::batch::Prepare;
    use ual::data::formats::parse_line;
    use ual::data::template::Template;
    let lines = [
        r#"{"instruction":"What is 2 + 3?","output":"2 + 3 = 5\n#### 5","uncertainty":1}"#,
        r#"{"instruction":"Write a haiku about rain.","output":"Soft rain on the roof, the garden drinks slowly.","uncertainty":10}"#,
        r#"{"prompt":"The capital of France is","completion":" Paris."}"#,
    ];
    let examples: Vec<_> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| parse_line(l, i + 1).unwrap())
        .collect();
    Prepare::new(&p.tokenizer, &Template::Alpaca, 2, 128)
        .examples(&examples)
        .unwrap()
        .0
}

/// A projection whose rows are not whole blocks cannot be Q4_0 (llama.cpp's quantizer refuses
/// it too): the loader keeps it dense and names it, rather than failing the whole model.
#[test]
fn rows_that_are_not_whole_blocks_stay_dense() {
    let dir = fixture_model("llama-gqa");
    let device = Device::flex();
    let types = packed(
        Dtypes {
            base: BaseDtype::Q4_0,
            precision: Precision::F32,
        },
        &device,
    );
    let p = Pretrained::load_as(&dir, &device, types).unwrap();
    assert!(
        p.model
            .projections()
            .all(|(_, p)| matches!(p.weight, Weight::Dense(_))),
        "a 16-wide model has no whole 32-value rows"
    );
}

/// One LoRA step's peak memory (`ual bench step`): heap on the CPU, the device's pool on wgpu.
fn step_peak(device: &str, base: &str) -> (u64, u64) {
    let out = common::ual()
        .args([
            "bench",
            "step",
            "--preset",
            "125m",
            "--seq-len",
            "64",
            "--batch-size",
            "1",
        ])
        .args([
            "--warmup",
            "0",
            "--steps",
            "1",
            "--device",
            device,
            "--base-dtype",
            base,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let peak = match report["peak_device_bytes"].as_u64() {
        Some(device_bytes) => device_bytes,
        None => report["peak_heap_bytes"].as_u64().unwrap(),
    };
    (peak, report["parameters"].as_u64().unwrap())
}

/// No code path keeps a dequantized copy of more than one projection: on the `125m` shape,
/// whose projections (85 M values, 340 MB in f32) outweigh the rest, a step on a Q4_0 base
/// peaks at least half the packing's saving below the f32 step (measured: 98 % of it on the
/// CPU, 68 % on lavapipe, whose pool keeps the pages of the dequantization's temporaries).
/// Were every layer's dequantized weight kept for the backward (burn's quantized matmul under
/// autodiff), the Q4_0 step would peak above the f32 one.
#[test]
fn a_q4_0_step_never_holds_the_dequantized_base() {
    // The seven projections of 12 layers of the 125m preset.
    let projections: u64 = 12 * (4 * 768 * 768 + 3 * 768 * 2048);
    let saving = projections * 4 - projections / 2 - projections / 32 * 2;
    for device in ["cpu", common::wgpu_spec()] {
        let (f32_peak, _) = step_peak(device, "f32");
        let (q4_peak, params) = step_peak(device, "q4_0");
        assert!(
            params > projections,
            "the report counts the packed base as parameters"
        );
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        eprintln!(
            "{device}: peak f32 {:.0} MiB, q4_0 {:.0} MiB (packing saves {:.0} MiB)",
            mib(f32_peak),
            mib(q4_peak),
            mib(saving)
        );
        assert!(
            q4_peak + saving / 2 <= f32_peak,
            "{device}: q4_0 peak {} MiB against f32 {} MiB",
            mib(q4_peak),
            mib(f32_peak)
        );
    }
}

/// A weight larger than one dequantization panel (4 Mi values: here 1024 of its rows and then
/// 16, or 4032 of its columns and then 64) gives the products of its dequantized copy, forward
/// and for the input's gradient, on the CPU and wgpu: to 1e-5 of the largest product, the
/// products' rounding over 4096 or 1040 terms (a panel changes which columns one product
/// writes, not its sums).
#[test]
fn products_a_panel_at_a_time_equal_the_whole_weight() {
    let (out, d_in, rows) = (1040, 4096, 20);
    let values: Vec<f32> = (0..out * d_in)
        .map(|i| ((i * 7919 % 2003) as f32 / 2003.0 - 0.5) * 0.1)
        .collect();
    let blocks = blocks::quantize_rows(BlockFormat::Q4_0, &values, d_in);
    for (name, device) in devices() {
        let weight =
            PackedWeight::new(BlockFormat::Q4_0, &blocks, [out, d_in], DType::F32, &device);
        let w = quant::dequantize(&weight);
        let autodiff = device.clone().autodiff();
        let x = Tensor::<2>::from_data(TensorData::new(wave(rows * d_in), [rows, d_in]), &autodiff)
            .require_grad();
        let g = Tensor::<2>::from_data(TensorData::new(wave(rows * out), [rows, out]), &device);
        let y = quant::linear(x.clone(), &weight);
        let grads = (y.clone() * Tensor::from_inner(g.clone())).sum().backward();
        let x_grad = x.grad(&grads).expect("x's gradient");
        let pairs = [
            (
                "forward",
                y.inner(),
                x.inner().matmul(w.clone().transpose()),
            ),
            ("input gradient", x_grad, g.matmul(w)),
        ];
        for (what, ours, theirs) in pairs {
            let ours = ours.into_data().try_to_vec::<f32>().unwrap();
            let theirs = theirs.into_data().try_to_vec::<f32>().unwrap();
            let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let gap = ours
                .iter()
                .zip(&theirs)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                scale > 0.0 && gap <= 1e-5 * scale,
                "{name} {what}: {gap} of {scale}"
            );
        }
    }
}

/// `n` values in [-1, 1) without a generator.
fn wave(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 104_729 % 1999) as f32 / 999.5) - 1.0)
        .collect()
}
