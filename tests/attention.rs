//! Causal self-attention (`ual::ops::attention`) against PyTorch's
//! `scaled_dot_product_attention` with autograd in float64 (`scripts/make_attention_fixtures.py`):
//! the output and the gradients of Σ grad·output with respect to q, k and v, causal and with a
//! sliding window, over more rows than one of the CPU kernel's blocks.
//!
//! On the CPU that is the kernel and its hand-written backward; on wgpu the composed burn ops,
//! differentiated by burn's autodiff, and the composed backward called directly; the composed
//! ops also on the CPU's primitives, so that they are checked without an adapter too.
//!
//! Tolerance: every entry within 1e-5·max(max |reference|, 1) of the case's reference (f32
//! scores over ≤ 8 terms and sums over ≤ 70 keys against float64).

mod common;

use burn::backend::Flex;
use burn::tensor::{Device, Tensor, TensorData};
use common::devices;
use serde::Deserialize;
use ual::ops::attention::{causal, causal_backward};

const TOLERANCE: f64 = 1e-5;

#[derive(Deserialize)]
struct Case {
    name: String,
    seed: u64,
    shape: [usize; 4],
    window: Option<usize>,
    output: Vec<f64>,
    grad_q: Vec<f64>,
    grad_k: Vec<f64>,
    grad_v: Vec<f64>,
}

fn cases() -> Vec<Case> {
    common::fixture_cases("attention.json")
}

/// The fixture script's hashed `[batch, heads, len, dim]` tensor, bit for bit.
fn hashed(seed: u64, shape: [usize; 4], scale: f32, device: &Device) -> Tensor<4> {
    let [b, h, s, d] = shape;
    let values = common::hashed_values(seed, b * h * s, d, scale);
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// q, k, v and the upstream gradient of a case.
fn inputs(case: &Case, device: &Device) -> ([Tensor<4>; 3], Tensor<4>) {
    let qkv = [0, 1, 2].map(|i| hashed(case.seed + i, case.shape, 2.0, device));
    (qkv, hashed(case.seed + 3, case.shape, 1.0, device))
}

fn assert_close(what: &str, actual: Tensor<4>, expected: &[f64]) {
    let actual = actual
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap();
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let bound = TOLERANCE * expected.iter().fold(1f64, |m, v| m.max(v.abs()));
    let (worst, at) = actual
        .iter()
        .zip(expected)
        .map(|(&a, &e)| (a as f64 - e).abs())
        .enumerate()
        .fold(
            (0f64, 0),
            |(w, i), (j, gap)| if gap > w { (gap, j) } else { (w, i) },
        );
    assert!(
        worst <= bound,
        "{what}: entry {at} is {} against {} (gap {worst:e} > {bound:e})",
        actual[at],
        expected[at]
    );
}

#[test]
fn attention_and_its_gradients_match_pytorch() {
    for (device_name, device) in devices() {
        let device = device.autodiff();
        for case in cases() {
            let what = |part: &str| format!("{device_name} {} {part}", case.name);
            let ([q, k, v], grad) = inputs(&case, &device);
            let [q, k, v] = [q, k, v].map(Tensor::require_grad);
            let output = causal(q.clone(), k.clone(), v.clone(), case.window);
            let grads = (output.clone() * grad).sum().backward();
            assert_close(&what("output"), output, &case.output);
            assert_close(&what("grad q"), q.grad(&grads).unwrap(), &case.grad_q);
            assert_close(&what("grad k"), k.grad(&grads).unwrap(), &case.grad_k);
            assert_close(&what("grad v"), v.grad(&grads).unwrap(), &case.grad_v);
        }
    }
}

#[test]
fn the_backward_alone_matches_pytorch() {
    for (device_name, device) in devices() {
        for case in cases() {
            let what = |part: &str| format!("{device_name} {} {part}", case.name);
            let (qkv, grad) = inputs(&case, &device);
            let output = causal(qkv[0].clone(), qkv[1].clone(), qkv[2].clone(), case.window);
            assert_close(&what("output"), output, &case.output);
            let [dq, dk, dv] = causal_backward(qkv, grad, case.window);
            assert_close(&what("grad q"), dq, &case.grad_q);
            assert_close(&what("grad k"), dk, &case.grad_k);
            assert_close(&what("grad v"), dv, &case.grad_v);
        }
    }
}

#[test]
fn strided_inputs_give_the_same_attention() {
    // Heads as the model makes them: a [batch, len, heads, dim] buffer with dims 1 and 2
    // swapped, so q, k and v are not contiguous; the result must not depend on it.
    let case = &cases()[0];
    let device = Device::flex();
    let ([q, k, v], _) = inputs(case, &device);
    let strided = |t: Tensor<4>| t.swap_dims(1, 2).into_data().convert::<f32>();
    let [q2, k2, v2] = [q.clone(), k.clone(), v.clone()]
        .map(|t| Tensor::<4>::from_data(strided(t), &device).swap_dims(1, 2));
    let dense = causal(q, k, v, None);
    let viewed = causal(q2, k2, v2, None);
    let gap = (dense - viewed).abs().max().into_scalar::<f32>();
    assert!(gap == 0.0, "strided inputs changed the output by {gap}");
}

#[test]
fn the_composed_ops_match_pytorch_on_the_cpu() {
    // The burn-op attention GPUs run, here on flex's primitives, so that it is checked against
    // the reference even where no wgpu adapter exists.
    use burn::backend::flex::FlexTensor;
    use ual::ops::attention::composed;
    for case in cases() {
        let what = |part: &str| format!("composed {} {part}", case.name);
        let primitive = |seed, scale| {
            let [b, h, s, d] = case.shape;
            let values = common::hashed_values(seed, b * h * s, d, scale);
            FlexTensor::from_data(TensorData::new(values, case.shape))
        };
        let [q, k, v] = [0, 1, 2].map(|i| primitive(case.seed + i, 2.0));
        let grad = primitive(case.seed + 3, 1.0);
        let window = case.window.unwrap_or(usize::MAX);
        let tensor = |t: FlexTensor| Tensor::<4>::from_data(t.into_data(), &Device::flex());
        let output = composed::forward::<Flex>(q.clone(), k.clone(), v.clone(), window);
        assert_close(&what("output"), tensor(output), &case.output);
        let (dq, dk, dv) = composed::backward::<Flex>(q, k, v, grad, window);
        assert_close(&what("grad q"), tensor(dq), &case.grad_q);
        assert_close(&what("grad k"), tensor(dk), &case.grad_k);
        assert_close(&what("grad v"), tensor(dv), &case.grad_v);
    }
}
