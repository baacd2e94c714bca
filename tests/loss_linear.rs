//! The fused linear cross-entropy (LM head + UAL loss in row blocks) against PyTorch's
//! `linear` + `cross_entropy(label_smoothing=ε)` with autograd, and against the unfused path
//! (head matmul, then the reference loss) under burn's autodiff, on CPU and wgpu; each with the
//! hidden gradient formed whole and over slices of the vocabulary (split-K).
//!
//! Tolerances (f32 against float64 references): the loss sum within 2e-5·max(|b|, 1); a hidden
//! gradient entry within 2e-5·max(max |b|, 1e-3) of the case; a sampled head-gradient entry
//! the same; Σgrad² within 1e-4 relative. The f32 matmul over H ≤ 64 terms is the extra error
//! beyond the loss's 1e-5.

mod common;

use burn::tensor::{Device, Tensor, TensorData};
use common::devices;
use serde::Deserialize;
use ual::loss::head::default_block_rows;
use ual::loss::{HeadBlocks, RowLabels, reference, ual_linear_loss_sum};

const RTOL: f64 = 2e-5;

#[derive(Deserialize)]
struct Case {
    name: String,
    seed: u64,
    rows: usize,
    hidden: usize,
    vocab: usize,
    head_scale: f32,
    targets: Vec<u32>,
    smoothing: Vec<f32>,
    mask: Vec<bool>,
    loss_sum: f64,
    count: usize,
    grad_hidden: Vec<f64>,
    grad_head: Sampled,
}

#[derive(Deserialize)]
struct Sampled {
    rows: Vec<usize>,
    columns: Vec<usize>,
    values: Vec<f64>,
    sum_squares: f64,
}

fn cases() -> Vec<Case> {
    common::fixture_cases("loss/linear.json")
}

/// The fixture script's hashed matrix, bit for bit.
fn hashed(seed: u64, rows: usize, cols: usize, scale: f32, device: &Device) -> Tensor<2> {
    let values = common::hashed_values(seed, rows, cols, scale);
    Tensor::from_data(TensorData::new(values, [rows, cols]), device)
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

fn assert_close(what: &str, a: f64, b: f64, tol: f64) {
    assert!(
        (a - b).abs() <= tol,
        "{what}: {a} vs expected {b} (tol {tol:e})"
    );
}

fn check_case(case: &Case, device: &Device, device_name: &str, blocks: HeadBlocks) {
    let device = device.clone().autodiff();
    let what = format!(
        "{} on {device_name}, {} rows per block, {} vocabulary slices",
        case.name, blocks.block_rows, blocks.vocab_splits
    );
    let hidden = hashed(case.seed, case.rows, case.hidden, 1.0, &device).require_grad();
    let head = hashed(
        case.seed + 1000,
        case.hidden,
        case.vocab,
        case.head_scale,
        &device,
    )
    .require_grad();
    let labels = RowLabels::new(
        case.targets.clone(),
        case.smoothing.clone(),
        case.mask.clone(),
    )
    .unwrap();
    let loss = ual_linear_loss_sum(hidden.clone(), head.clone(), &labels, blocks).unwrap();
    assert_eq!(loss.count, case.count, "{what}");
    let sum = to_vec(loss.sum.clone())[0] as f64;
    assert_close(
        &format!("{what}: loss sum"),
        sum,
        case.loss_sum,
        RTOL * case.loss_sum.abs().max(1.0),
    );
    let grads = loss.sum.backward();
    let grad_hidden = to_vec(hidden.grad(&grads).unwrap());
    let scale = case.grad_hidden.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    for (i, (&a, &b)) in grad_hidden.iter().zip(&case.grad_hidden).enumerate() {
        assert_close(
            &format!("{what}: grad_hidden[{i}]"),
            a as f64,
            b,
            RTOL * scale,
        );
    }
    let grad_head = to_vec(head.grad(&grads).unwrap());
    let s = &case.grad_head;
    let scale = s.values.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    for ((&r, &c), &b) in s.rows.iter().zip(&s.columns).zip(&s.values) {
        let a = grad_head[r * case.vocab + c] as f64;
        assert_close(&format!("{what}: grad_head[{r}, {c}]"), a, b, RTOL * scale);
    }
    let ss: f64 = grad_head.iter().map(|&g| (g as f64).powi(2)).sum();
    assert_close(
        &format!("{what}: head Σgrad²"),
        ss,
        s.sum_squares,
        1e-4 * s.sum_squares.max(1e-6),
    );
}

#[test]
fn fused_linear_loss_and_gradients_match_pytorch() {
    for (device_name, device) in devices() {
        for case in cases() {
            // One block, a block that does not divide the rows, and (small V) one row per block;
            // where V allows, the hidden gradient also over 8 vocabulary slices.
            let mut sizes = vec![default_block_rows(case.vocab), 2];
            if case.vocab <= 1000 {
                sizes.push(1);
            }
            let splits: &[usize] = if case.vocab % 8 == 0 { &[1, 8] } else { &[1] };
            for rows in sizes {
                for &vocab_splits in splits {
                    let blocks = HeadBlocks {
                        block_rows: rows,
                        vocab_splits,
                    };
                    check_case(&case, &device, device_name, blocks);
                }
            }
        }
        eprintln!("{device_name}: all fused linear loss fixtures match PyTorch");
    }
}

fn labels(rows: usize, vocab: usize) -> RowLabels {
    RowLabels::new(
        (0..rows as u32).map(|r| (r * 31) % vocab as u32).collect(),
        (0..rows).map(|r| [0.0, 0.1, 0.45, 0.8][r % 4]).collect(),
        (0..rows).map(|r| r % 4 != 2).collect(),
    )
    .unwrap()
}

/// A tied head is the embedding `[V, H]` transposed, a strided view rather than a copy; the
/// gradient must reach the embedding through that view exactly as the unfused matmul's does.
#[test]
fn tied_head_matches_unfused_reference_autodiff() {
    // 333 = 9 · 37: the split head is the embedding itself, sliced without a copy.
    let splits = [1, 9];
    for ((device_name, device), vocab_splits) in devices()
        .into_iter()
        .flat_map(|d| splits.map(|s| (d.clone(), s)))
    {
        let device = device.autodiff();
        let (rows, h, vocab) = (11, 24, 333);
        let blocks = HeadBlocks {
            block_rows: 4,
            vocab_splits,
        };
        let device_name = format!("{device_name}, {vocab_splits} vocabulary slices");
        let labels = labels(rows, vocab);
        let hidden = hashed(7, rows, h, 1.0, &device);
        let embedding = hashed(8, vocab, h, 0.8, &device);
        let (h1, e1) = (
            hidden.clone().require_grad(),
            embedding.clone().require_grad(),
        );
        let (h2, e2) = (hidden.require_grad(), embedding.require_grad());
        let fused = ual_linear_loss_sum(h1.clone(), e1.clone().transpose(), &labels, blocks)
            .unwrap()
            .sum;
        let logits = h2.clone().matmul(e2.clone().transpose());
        let unfused = reference::ual_loss_sum(logits, &labels).unwrap().sum;
        let (a, b) = (
            to_vec(fused.clone())[0] as f64,
            to_vec(unfused.clone())[0] as f64,
        );
        assert_close(
            &format!("{device_name}: loss"),
            a,
            b,
            1e-5 * b.abs().max(1.0),
        );
        // Scale the loss, as the objective's mean does, to check the upstream gradient is used.
        let (gf, gu) = (
            fused.mul_scalar(0.25).backward(),
            unfused.mul_scalar(0.25).backward(),
        );
        for (name, x, y) in [
            ("hidden", h1.grad(&gf).unwrap(), h2.grad(&gu).unwrap()),
            ("embedding", e1.grad(&gf).unwrap(), e2.grad(&gu).unwrap()),
        ] {
            for (i, (p, q)) in to_vec(x).iter().zip(to_vec(y)).enumerate() {
                assert!(
                    (p - q).abs() <= 1e-5,
                    "{device_name}: {name} grad[{i}] fused {p} vs unfused {q}"
                );
            }
        }
    }
}

/// A frozen head kept in f16 (a reduced base keeps an f16 checkpoint's head so) gives the loss
/// and hidden gradient of the same head widened to f32. Its 256 × 40,000 values are more than
/// the 2²³ the loss widens at once, so it is multiplied in two vocabulary slices: the logits
/// are the same products, and only the hidden gradient's sum is split in two (1e-5).
#[test]
fn a_half_head_gives_the_loss_of_its_f32_values() {
    use burn::tensor::DType;
    for (device_name, device) in devices() {
        let (rows, h, vocab) = (6, 256, 40_000);
        let blocks = HeadBlocks::unsplit(4);
        let labels = labels(rows, vocab);
        let ad = device.clone().autodiff();
        let half = hashed(5, h, vocab, 0.5, &ad).cast(DType::F16);
        let widened = half.clone().cast(DType::F32);
        let run = |head: Tensor<2>| {
            let hidden = hashed(6, rows, h, 1.0, &ad).require_grad();
            let loss = ual_linear_loss_sum(hidden.clone(), head, &labels, blocks).unwrap();
            let value = to_vec(loss.sum.clone())[0];
            let grads = loss.sum.backward();
            (value, to_vec(hidden.grad(&grads).unwrap()))
        };
        let ((ours, g1), (theirs, g2)) = (run(half), run(widened));
        assert_close(
            &format!("{device_name}: loss"),
            ours as f64,
            theirs as f64,
            1e-5 * (theirs as f64).abs().max(1.0),
        );
        for (i, (p, q)) in g1.iter().zip(&g2).enumerate() {
            assert!((p - q).abs() <= 1e-5, "{device_name}: grad[{i}] {p} vs {q}");
        }
    }
}

/// LoRA freezes the head: only the hidden states' gradient is formed, and it is unchanged.
/// Without autodiff (evaluation) the same sum comes back.
#[test]
fn frozen_head_and_inference_give_the_same_loss() {
    let splits = [1, 8];
    for ((device_name, device), vocab_splits) in devices()
        .into_iter()
        .flat_map(|d| splits.map(|s| (d.clone(), s)))
    {
        let (rows, h, vocab) = (9, 16, 1000);
        let blocks = HeadBlocks {
            block_rows: 2,
            vocab_splits,
        };
        let device_name = format!("{device_name}, {vocab_splits} vocabulary slices");
        let labels = labels(rows, vocab);
        let ad = device.clone().autodiff();
        let hidden = hashed(3, rows, h, 1.0, &ad).require_grad();
        let head = hashed(4, h, vocab, 0.5, &ad);
        let loss = ual_linear_loss_sum(hidden.clone(), head.clone(), &labels, blocks).unwrap();
        let tracked = to_vec(loss.sum.clone())[0];
        let grads = loss.sum.backward();
        assert!(
            head.grad(&grads).is_none(),
            "{device_name}: a frozen head got a gradient"
        );
        let g = to_vec(hidden.grad(&grads).unwrap());
        let hidden2 = hashed(3, rows, h, 1.0, &ad).require_grad();
        let logits = hidden2.clone().matmul(head);
        let grads2 = reference::ual_loss_sum(logits, &labels)
            .unwrap()
            .sum
            .backward();
        for (i, (p, q)) in g
            .iter()
            .zip(to_vec(hidden2.grad(&grads2).unwrap()))
            .enumerate()
        {
            assert!((p - q).abs() <= 1e-5, "{device_name}: grad[{i}] {p} vs {q}");
        }
        let plain = ual_linear_loss_sum(
            hashed(3, rows, h, 1.0, &device),
            hashed(4, h, vocab, 0.5, &device),
            &labels,
            HeadBlocks::unsplit(3),
        )
        .unwrap();
        let untracked = to_vec(plain.sum)[0];
        assert!(
            (tracked - untracked).abs() <= 1e-5 * tracked.abs().max(1.0),
            "{device_name}: {tracked} with autodiff vs {untracked} without"
        );
    }
}

#[test]
fn mismatched_shapes_and_targets_are_errors() {
    let device = Device::flex();
    let labels = labels(4, 10);
    let err = ual_linear_loss_sum(
        hashed(1, 4, 8, 1.0, &device),
        hashed(2, 6, 10, 1.0, &device),
        &labels,
        HeadBlocks::unsplit(2),
    )
    .err()
    .expect("width mismatch");
    assert!(err.to_string().contains("hidden width 8"), "{err}");
    let err = ual_linear_loss_sum(
        hashed(1, 4, 8, 1.0, &device),
        hashed(2, 8, 3, 1.0, &device),
        &labels,
        HeadBlocks::unsplit(2),
    )
    .err()
    .expect("target outside the vocabulary");
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
}
