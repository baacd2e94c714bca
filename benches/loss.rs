//! Criterion bench: fused vs reference UAL loss, forward + backward, on the CPU and on wgpu.

use burn::tensor::{Device, Tensor, TensorData};
use criterion::{Criterion, criterion_group, criterion_main};
use ual::loss::{RowLabels, reference, ual_loss_sum};

fn bench_device(c: &mut Criterion, name: &str, device: Device) {
    let (rows, vocab) = (256, 32_000);
    let device = device.autodiff();
    let labels = RowLabels::new(
        (0..rows).map(|r| (r * 131 % vocab) as u32).collect(),
        vec![0.1; rows],
        vec![true; rows],
    )
    .unwrap();
    let values: Vec<f32> = (0..rows * vocab)
        .map(|i| (i % 997) as f32 / 100.0 - 5.0)
        .collect();
    let logits =
        Tensor::<2>::from_data(TensorData::new(values, [rows, vocab]), &device).require_grad();
    let mut group = c.benchmark_group(format!("ual_loss_{name}_{rows}x{vocab}"));
    group.sample_size(10);
    group.bench_function("fused", |b| {
        b.iter(|| {
            let grads = ual_loss_sum(logits.clone(), &labels)
                .unwrap()
                .sum
                .backward();
            logits
                .grad(&grads)
                .unwrap()
                .slice([0..1, 0..1])
                .into_scalar::<f32>()
        })
    });
    group.bench_function("reference", |b| {
        b.iter(|| {
            let grads = reference::ual_loss_sum(logits.clone(), &labels)
                .unwrap()
                .sum
                .backward();
            logits
                .grad(&grads)
                .unwrap()
                .slice([0..1, 0..1])
                .into_scalar::<f32>()
        })
    });
    group.finish();
}

fn loss(c: &mut Criterion) {
    bench_device(c, "cpu", Device::flex());
    if let Ok(selected) = ual::device::select(ual::device::DeviceSpec::Wgpu(0)) {
        bench_device(c, "wgpu", selected.device);
    } else {
        eprintln!("NOTICE: no wgpu adapter; the wgpu loss bench did not run");
    }
}

criterion_group!(benches, loss);
criterion_main!(benches);
