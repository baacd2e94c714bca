//! The fused UAL loss against PyTorch's `cross_entropy(label_smoothing=ε)`, against our
//! reference implementation's autodiff, and against finite differences, on CPU and wgpu.
//!
//! Tolerances (f32): a loss `a` matches `b` when |a − b| ≤ 1e-5·max(|b|, 1); a gradient entry
//! matches when |a − b| ≤ 1e-5·max(max_k |b_k|, 1e-3) over its row, since softmax entries
//! near zero carry no relative precision.

mod common;

use burn::tensor::{Device, Tensor, TensorData};
use common::devices;
use serde::Deserialize;
use ual::loss::{RowLabels, reference, ual_loss_mean, ual_loss_sum, ual_row_losses};

const LOSS_RTOL: f64 = 1e-5;
const GRAD_RTOL: f64 = 1e-5;

#[derive(Deserialize)]
struct Case {
    name: String,
    seed: u64,
    rows: usize,
    vocab: usize,
    scale: f32,
    targets: Vec<u32>,
    smoothing: Vec<f32>,
    mask: Vec<bool>,
    row_losses: Vec<f64>,
    loss_sum: f64,
    count: usize,
    grads: Vec<RowGrad>,
}

#[derive(Deserialize)]
struct RowGrad {
    columns: Vec<usize>,
    values: Vec<f64>,
    sum_squares: f64,
}

fn cases() -> Vec<Case> {
    common::fixture_cases("loss/cases.json")
}

/// The fixture script's logits, bit for bit.
fn hashed_logits(seed: u64, rows: usize, vocab: usize, scale: f32) -> Vec<f32> {
    common::hashed_values(seed, rows, vocab, scale)
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

fn labels(case: &Case) -> RowLabels {
    RowLabels::new(
        case.targets.clone(),
        case.smoothing.clone(),
        case.mask.clone(),
    )
    .unwrap()
}

fn check_case(case: &Case, device: &Device, device_name: &str) {
    let device = device.clone().autodiff();
    let values = hashed_logits(case.seed, case.rows, case.vocab, case.scale);
    let logits = Tensor::<2>::from_data(TensorData::new(values, [case.rows, case.vocab]), &device)
        .require_grad();
    let labels = labels(case);
    let rows = to_vec(ual_row_losses(logits.clone(), &labels).unwrap());
    for (r, (&a, &b)) in rows.iter().zip(&case.row_losses).enumerate() {
        assert!(
            close(a as f64, b, LOSS_RTOL * b.abs().max(1.0)),
            "{} on {device_name}: row {r} loss {a} vs torch {b}",
            case.name
        );
    }
    let sum = ual_loss_sum(logits.clone(), &labels).unwrap();
    assert_eq!(sum.count, case.count, "{}", case.name);
    let grads = sum.sum.backward();
    let grad = to_vec(logits.grad(&grads).unwrap());
    for (r, expected) in case.grads.iter().enumerate() {
        let row = &grad[r * case.vocab..(r + 1) * case.vocab];
        let scale = expected.values.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
        for (&c, &b) in expected.columns.iter().zip(&expected.values) {
            assert!(
                close(row[c] as f64, b, GRAD_RTOL * scale),
                "{} on {device_name}: grad[{r}, {c}] = {} vs torch {b}",
                case.name,
                row[c]
            );
        }
        let ss: f64 = row.iter().map(|&g| (g as f64).powi(2)).sum();
        assert!(
            close(
                ss,
                expected.sum_squares,
                1e-4 * expected.sum_squares.max(1e-6)
            ),
            "{} on {device_name}: row {r} Σgrad² {ss} vs torch {}",
            case.name,
            expected.sum_squares
        );
    }
    let total = case.loss_sum;
    let ours: f64 = rows.iter().map(|&v| v as f64).sum();
    assert!(
        close(ours, total, LOSS_RTOL * total.abs().max(1.0)),
        "{}: sum {ours} vs {total}",
        case.name
    );
}

#[test]
fn fused_loss_and_gradient_match_pytorch() {
    for (device_name, device) in devices() {
        for case in cases() {
            check_case(&case, &device, device_name);
        }
        eprintln!("{device_name}: all loss fixtures match PyTorch");
    }
}

/// Random logits of small magnitude, for the comparisons that need no fixture.
fn random_logits(rows: usize, vocab: usize, device: &Device) -> Tensor<2> {
    Tensor::from_data(
        TensorData::new(hashed_logits(99, rows, vocab, 6.0), [rows, vocab]),
        device,
    )
}

#[test]
fn fused_gradient_equals_reference_autodiff() {
    for (device_name, device) in devices() {
        let device = device.autodiff();
        for vocab in [5, 257, 4099] {
            let rows = 9;
            let labels = RowLabels::new(
                (0..rows as u32).map(|r| (r * 31) % vocab as u32).collect(),
                (0..rows).map(|r| [0.0, 0.1, 0.45, 0.8][r % 4]).collect(),
                (0..rows).map(|r| r % 4 != 2).collect(),
            )
            .unwrap();
            let z = random_logits(rows, vocab, &device);
            let (a, b) = (z.clone().require_grad(), z.require_grad());
            let fused = ual_loss_sum(a.clone(), &labels).unwrap().sum;
            let refer = reference::ual_loss_sum(b.clone(), &labels).unwrap().sum;
            let (lf, lr) = (
                to_vec(fused.clone())[0] as f64,
                to_vec(refer.clone())[0] as f64,
            );
            assert!(
                close(lf, lr, 1e-5 * lr.abs().max(1.0)),
                "{device_name} V={vocab}: {lf} vs {lr}"
            );
            let (gf, gr) = (fused.backward(), refer.backward());
            let (gf, gr) = (to_vec(a.grad(&gf).unwrap()), to_vec(b.grad(&gr).unwrap()));
            for (i, (x, y)) in gf.iter().zip(&gr).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-6,
                    "{device_name} V={vocab}: grad[{i}] {x} vs reference {y}"
                );
            }
        }
    }
}

#[test]
fn finite_differences_agree_with_fused_gradient() {
    let device = Device::flex().autodiff();
    let (rows, vocab) = (3, 7);
    let labels =
        RowLabels::new(vec![1, 6, 3], vec![0.0, 0.3, 0.9], vec![true, true, true]).unwrap();
    let base = hashed_logits(5, rows, vocab, 3.0);
    let loss_at = |values: Vec<f32>| -> f64 {
        let z = Tensor::<2>::from_data(TensorData::new(values, [rows, vocab]), &device);
        to_vec(ual_loss_sum(z, &labels).unwrap().sum)[0] as f64
    };
    let z = Tensor::<2>::from_data(TensorData::new(base.clone(), [rows, vocab]), &device)
        .require_grad();
    let grads = ual_loss_sum(z.clone(), &labels).unwrap().sum.backward();
    let analytic = to_vec(z.grad(&grads).unwrap());
    let h = 1e-2f32;
    for i in 0..rows * vocab {
        let (mut plus, mut minus) = (base.clone(), base.clone());
        plus[i] += h;
        minus[i] -= h;
        let numeric = (loss_at(plus) - loss_at(minus)) / (2.0 * h as f64);
        // Central differences in f32 carry O(h²) truncation and ~1e-5 rounding: 2e-3 absolute.
        assert!(
            (numeric - analytic[i] as f64).abs() < 2e-3,
            "entry {i}: fd {numeric} vs {}",
            analytic[i]
        );
    }
}

#[test]
fn zero_smoothing_is_plain_cross_entropy() {
    use burn::nn::loss::CrossEntropyLossConfig;
    for (device_name, device) in devices() {
        let (rows, vocab) = (16, 300);
        let targets: Vec<u32> = (0..rows as u32).map(|r| r * 17 % vocab as u32).collect();
        let z = random_logits(rows, vocab, &device);
        let ours = to_vec(
            ual_loss_mean(
                z.clone(),
                &RowLabels::uniform(targets.clone(), 0.0).unwrap(),
            )
            .unwrap(),
        )[0];
        let ids = Tensor::<1, burn::tensor::Int>::from_data(
            TensorData::new(
                targets.iter().map(|&t| t as i64).collect::<Vec<_>>(),
                [rows],
            ),
            &device,
        );
        let plain = to_vec(CrossEntropyLossConfig::new().init(&device).forward(z, ids))[0];
        assert!(
            (ours - plain).abs() <= 1e-5 * plain.abs().max(1.0),
            "{device_name}: {ours} vs burn CE {plain}"
        );
    }
}

#[test]
fn all_masked_batch_is_zero_not_nan() {
    for (device_name, device) in devices() {
        let device = device.autodiff();
        let labels = RowLabels::new(vec![0, 1, 2], vec![0.1; 3], vec![false; 3]).unwrap();
        let z = random_logits(3, 11, &device).require_grad();
        let sum = ual_loss_sum(z.clone(), &labels).unwrap();
        assert_eq!(sum.count, 0);
        assert_eq!(to_vec(sum.sum.clone())[0], 0.0, "{device_name}");
        let grad = to_vec(z.grad(&sum.sum.backward()).unwrap());
        assert!(
            grad.iter().all(|&g| g == 0.0),
            "{device_name}: masked rows get zero gradient"
        );
        assert_eq!(to_vec(ual_loss_mean(z, &labels).unwrap())[0], 0.0);
    }
}

#[test]
fn smoothing_outside_unit_interval_is_rejected() {
    for eps in [-0.1, 1.0, 1.5, f32::NAN] {
        let err = RowLabels::new(vec![0, 1], vec![0.1, eps], vec![true, true]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("row 1") && msg.contains("[0, 1)"), "{msg}");
    }
    let z = random_logits(2, 4, &Device::flex());
    let err = ual_loss_sum(z, &RowLabels::uniform(vec![0, 4], 0.1).unwrap())
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("target 4 at row 1"));
}

#[test]
fn f16_logits_accumulate_in_f32() {
    let device = common::wgpu_device();
    if !device.supports_dtype(burn::tensor::DType::F16) {
        panic!("this adapter lacks SHADER_F16; lavapipe and every CI adapter have it");
    }
    let (rows, vocab) = (4, 70_000); // Σexp over 70k entries would overflow f16.
    let labels = RowLabels::new(
        vec![3, 9, 69_999, 0],
        vec![0.0, 0.1, 0.2, 0.9],
        vec![true; 4],
    )
    .unwrap();
    let z32 = random_logits(rows, vocab, &device);
    let z16 = z32.clone().cast(burn::tensor::DType::F16);
    // Compare against f32 logits rounded to f16, so only accumulation precision differs.
    let rounded = z16.clone().cast(burn::tensor::DType::F32);
    let a = to_vec(ual_row_losses(z16, &labels).unwrap());
    let b = to_vec(ual_row_losses(rounded, &labels).unwrap());
    for (x, y) in a.iter().zip(&b) {
        assert!(
            x.is_finite() && (x - y).abs() <= 1e-4 * y.abs().max(1.0),
            "f16 {x} vs f32 {y}"
        );
    }
}

/// The wgpu half of these tests ran the kernels under the compiler this build gives a Vulkan
/// adapter: SPIR-V by default (where they are dispatched through wgpu directly), WGSL with
/// `--no-default-features` (where cubecl launches them). lavapipe cannot run burn's own SPIR-V,
/// so CI runs this file on WGSL twice: as cubecl launches the kernels, and with
/// `UAL_DIRECT_DISPATCH=1`, through wgpu directly as SPIR-V and MSL have them; both launch
/// paths then meet the PyTorch fixtures above.
#[test]
fn the_loss_runs_under_the_compiler_this_build_chooses() {
    let Ok(selected) = ual::device::select(ual::device::DeviceSpec::Wgpu(0)) else {
        common::wgpu_device();
        return;
    };
    let listed = ual::device::adapters();
    let compiler = ual::device::compilers(&listed)[0].expect("the adapter came up");
    let vulkan = listed[0].backend == "Vulkan";
    let expected = if cfg!(feature = "native-compilers") && vulkan && !cfg!(target_os = "macos") {
        ual::ops::wgsl::Compiler::Spirv
    } else if cfg!(feature = "native-compilers") && cfg!(target_os = "macos") {
        ual::ops::wgsl::Compiler::Msl
    } else {
        ual::ops::wgsl::Compiler::Wgsl
    };
    assert_eq!(compiler, expected, "{}", selected.description);
    assert!(
        selected.description.contains(&compiler.to_string()),
        "the chosen device names its compiler: {}",
        selected.description
    );
    // And the kernel's result is the reference's under it (1e-5, as above).
    let device = selected.device;
    let logits = random_logits(5, 333, &device);
    let labels = RowLabels::new(
        vec![1, 7, 300, 0, 42],
        vec![0.0, 0.1, 0.5, 0.9, 0.2],
        vec![true; 5],
    )
    .unwrap();
    let before = ual::ops::wgsl::direct_dispatches();
    let fused = to_vec(ual_row_losses(logits.clone(), &labels).unwrap());
    let direct = ual::ops::wgsl::direct_dispatches() > before;
    let forced = std::env::var(ual::ops::wgsl::DIRECT_DISPATCH).as_deref() == Ok("1");
    assert_eq!(
        direct,
        forced || !compiler.runs_wgsl_source(),
        "the kernel went through wgpu directly exactly where it must"
    );
    let composed = to_vec(reference::row_losses(logits, &labels).unwrap());
    for (a, b) in fused.iter().zip(&composed) {
        assert!(
            close(*a as f64, *b as f64, LOSS_RTOL),
            "{compiler}: {a} vs {b}"
        );
    }
}
