//! Criterion bench: causal attention, forward + backward under autodiff on the CPU, at the
//! `125m` preset's shape: the kernel with its hand-written backward (`attention::causal`)
//! against the same attention composed of burn ops (the model's code before the kernel), whose
//! probabilities burn's autodiff keeps.

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};
use criterion::{Criterion, criterion_group, criterion_main};
use ual::ops::attention;

const SHAPE: [usize; 4] = [4, 12, 512, 64];

fn input(seed: usize, device: &Device) -> Tensor<4> {
    let n = SHAPE.iter().product::<usize>();
    let values: Vec<f32> = (0..n)
        .map(|i| ((i * 2_654_435_761 + seed * 97) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    Tensor::from_data(TensorData::new(values, SHAPE), device).require_grad()
}

/// softmax(q·kᵀ/√d + mask)·v in burn ops, the causal mask as an additive `[len, len]` tensor.
fn composed(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let [b, h, s, d] = q.dims();
    let mask: Vec<f32> = (0..s * s)
        .map(|i| if i % s <= i / s { 0.0 } else { -1e30 })
        .collect();
    let mask = Tensor::<2>::from_data(TensorData::new(mask, [s, s]), &q.device());
    let scores = q
        .matmul(k.swap_dims(2, 3))
        .mul_scalar((d as f64).powf(-0.5))
        + mask.unsqueeze::<4>().expand([b, h, s, s]);
    softmax(scores, 3).matmul(v)
}

fn bench(c: &mut Criterion) {
    let device = Device::flex().autodiff();
    let [q, k, v] = [0, 1, 2].map(|seed| input(seed, &device));
    let grad = input(3, &device).detach();
    let mut group = c.benchmark_group("attention_cpu_4x12x512x64");
    group.sample_size(10);
    let step = |f: fn(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>| {
        let grads = (f(q.clone(), k.clone(), v.clone()) * grad.clone())
            .sum()
            .backward();
        q.grad(&grads)
            .unwrap()
            .slice([0..1, 0..1, 0..1, 0..1])
            .into_scalar::<f32>()
    };
    group.bench_function("kernel", |b| {
        b.iter(|| step(|q, k, v| attention::causal(q, k, v, None)))
    });
    group.bench_function("composed", |b| b.iter(|| step(composed)));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
