//! Causal self-attention (`ual::ops::attention`) against PyTorch's
//! `scaled_dot_product_attention` with autograd in float64 (`scripts/make_attention_fixtures.py`):
//! the output and the gradients of Σ grad·output with respect to q, k and v, causal, with a
//! sliding window and with grouped-query heads, over more rows than one of the kernels' blocks
//! and heads as wide as Llama's.
//!
//! On the CPU that is the CPU kernel and its hand-written backward; on wgpu the WGSL flash
//! kernels (`shaders/ual_attention_*.wgsl`), under autodiff and their backward called directly;
//! the composed burn ops on the CPU's primitives, so that the fallback is checked too.
//!
//! Tolerance: every entry within 1e-5·max(max |reference|, 1) of the case's reference (f32
//! scores over ≤ 128 terms and sums over ≤ 130 keys against float64).

mod common;

use burn::backend::Flex;
use burn::tensor::{Device, Tensor, TensorData};
use common::devices;
use serde::Deserialize;
use ual::ops::attention::{causal, causal_backward};

const TOLERANCE: f64 = 1e-5;
/// For the f16 kernels: see [`the_f16_kernels_match_pytorch_to_f16_rounding`].
const TOLERANCE_F16: f64 = 4e-3;

/// Held by the tests that count kernel launches, so that no other test launches meanwhile.
static LAUNCH_COUNT: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn counting() -> std::sync::MutexGuard<'static, ()> {
    LAUNCH_COUNT.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Deserialize)]
struct Case {
    name: String,
    seed: u64,
    shape: [usize; 4],
    window: Option<usize>,
    /// Key/value heads where fewer than the query heads (grouped-query attention).
    kv_heads: Option<usize>,
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

impl Case {
    /// The shape of k and v: as q's, with the case's key/value heads.
    fn kv_shape(&self) -> [usize; 4] {
        let [b, h, s, d] = self.shape;
        [b, self.kv_heads.unwrap_or(h), s, d]
    }
}

/// q, k, v and the upstream gradient of a case.
fn inputs(case: &Case, device: &Device) -> ([Tensor<4>; 3], Tensor<4>) {
    let q = hashed(case.seed, case.shape, 2.0, device);
    let [k, v] = [1, 2].map(|i| hashed(case.seed + i, case.kv_shape(), 2.0, device));
    ([q, k, v], hashed(case.seed + 3, case.shape, 1.0, device))
}

fn assert_close(what: &str, actual: Tensor<4>, expected: &[f64]) {
    assert_within(what, actual, expected, TOLERANCE)
}

fn assert_within(what: &str, actual: Tensor<4>, expected: &[f64], tolerance: f64) {
    let actual = actual
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap();
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let bound = tolerance * expected.iter().fold(1f64, |m, v| m.max(v.abs()));
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
    let _counting = counting();
    for (device_name, device) in devices() {
        let device = device.autodiff();
        for case in cases() {
            let what = |part: &str| format!("{device_name} {} {part}", case.name);
            let ([q, k, v], grad) = inputs(&case, &device);
            let [q, k, v] = [q, k, v].map(Tensor::require_grad);
            let launched = ual::ops::wgsl::launches();
            let output = causal(q.clone(), k.clone(), v.clone(), case.window);
            let grads = (output.clone() * grad).sum().backward();
            // On an adapter autodiff took the kernels' backward: the forward and two parts.
            if common::is_wgpu(&device) {
                assert_eq!(
                    ual::ops::wgsl::launches() - launched,
                    3,
                    "{}",
                    what("launches")
                );
            }
            assert_close(&what("output"), output, &case.output);
            assert_close(&what("grad q"), q.grad(&grads).unwrap(), &case.grad_q);
            assert_close(&what("grad k"), k.grad(&grads).unwrap(), &case.grad_k);
            assert_close(&what("grad v"), v.grad(&grads).unwrap(), &case.grad_v);
        }
    }
}

#[test]
fn the_backward_alone_matches_pytorch() {
    let _counting = counting();
    for (device_name, device) in devices() {
        for case in cases() {
            let what = |part: &str| format!("{device_name} {} {part}", case.name);
            let (qkv, grad) = inputs(&case, &device);
            let launched = ual::ops::wgsl::launches();
            let output = causal(qkv[0].clone(), qkv[1].clone(), qkv[2].clone(), case.window);
            assert_close(&what("output"), output, &case.output);
            let [dq, dk, dv] = causal_backward(qkv, grad, case.window);
            // On an adapter, the flash kernels ran: two forwards (one inside the backward call)
            // and the backward's two parts, never the composed ops.
            if common::is_wgpu(&device) {
                assert_eq!(
                    ual::ops::wgsl::launches() - launched,
                    4,
                    "{}",
                    what("launches")
                );
            }
            assert_close(&what("grad q"), dq, &case.grad_q);
            assert_close(&what("grad k"), dk, &case.grad_k);
            assert_close(&what("grad v"), dv, &case.grad_v);
        }
    }
}

/// The flash kernels in f16 on the adapter (f32 sums inside): q, k, v and the upstream gradient
/// rounded to f16 (relative error u = 2⁻¹¹ ≈ 4.9e-4), against the float64 reference of the
/// unrounded inputs. A rounded q or k moves a score s by about 2·u·|s| and the probabilities
/// with it, and each result is rounded to f16 once more, so the error is a few u times the
/// scores' size, which stays near 1 in these fixtures: bound 8·u = 4e-3 of each case's largest
/// value (measured below 1e-3).
#[test]
fn the_f16_kernels_match_pytorch_to_f16_rounding() {
    use burn::tensor::DType;
    let _counting = counting();
    let device = common::wgpu_device();
    if !common::is_wgpu(&device) {
        return; // wgpu_device printed the notice (or failed under UAL_REQUIRE_WGPU=1).
    }
    assert!(
        device.supports_dtype(DType::F16),
        "this adapter lacks SHADER_F16; lavapipe and every CI adapter have it"
    );
    let device = device.autodiff();
    for case in cases() {
        let what = |part: &str| format!("f16 {} {part}", case.name);
        let ([q, k, v], grad) = inputs(&case, &device);
        let [q, k, v] = [q, k, v].map(|t| t.cast(DType::F16).detach().require_grad());
        let launched = ual::ops::wgsl::launches();
        let output = causal(q.clone(), k.clone(), v.clone(), case.window);
        assert_eq!(output.dtype(), DType::F16, "{}", what("dtype"));
        let grads = (output.clone() * grad.cast(DType::F16)).sum().backward();
        let wide = |t: Tensor<4>| t.cast(DType::F32);
        assert_within(&what("output"), wide(output), &case.output, TOLERANCE_F16);
        assert_within(
            &what("grad q"),
            wide(q.grad(&grads).unwrap()),
            &case.grad_q,
            TOLERANCE_F16,
        );
        assert_within(
            &what("grad k"),
            wide(k.grad(&grads).unwrap()),
            &case.grad_k,
            TOLERANCE_F16,
        );
        assert_within(
            &what("grad v"),
            wide(v.grad(&grads).unwrap()),
            &case.grad_v,
            TOLERANCE_F16,
        );
        // Counted after the read-back: fusion may defer the launches until then.
        assert_eq!(
            ual::ops::wgsl::launches() - launched,
            3,
            "{}",
            what("launches")
        );
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
        let primitive = |seed, shape: [usize; 4], scale| {
            let [b, h, s, d] = shape;
            let values = common::hashed_values(seed, b * h * s, d, scale);
            FlexTensor::from_data(TensorData::new(values, shape))
        };
        let q = primitive(case.seed, case.shape, 2.0);
        let [k, v] = [1, 2].map(|i| primitive(case.seed + i, case.kv_shape(), 2.0));
        let grad = primitive(case.seed + 3, case.shape, 1.0);
        let window = case.window.unwrap_or(usize::MAX);
        let tensor = |t: FlexTensor| Tensor::<4>::from_data(t.into_data(), &Device::flex());
        let (output, _lse) = composed::forward::<Flex>(q.clone(), k.clone(), v.clone(), window);
        assert_close(&what("output"), tensor(output), &case.output);
        let (dq, dk, dv) = composed::backward::<Flex>(q, k, v, grad, window);
        assert_close(&what("grad q"), tensor(dq), &case.grad_q);
        assert_close(&what("grad k"), tensor(dk), &case.grad_k);
        assert_close(&what("grad v"), tensor(dv), &case.grad_v);
    }
}
