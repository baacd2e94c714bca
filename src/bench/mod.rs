//! `ual bench`: machine-readable performance figures, measured side by side in one process.

pub mod step;

use std::time::Instant;

use anyhow::Result;
use burn::tensor::{Device, Tensor, TensorData};
use serde::Serialize;

use crate::loss::{LossSum, RowLabels, reference, ual_loss_sum};

/// Time and memory of one loss implementation at one size.
#[derive(Debug, Clone, Serialize)]
pub struct LossTiming {
    /// Mean seconds per forward + backward, after one warm-up step.
    pub seconds_per_step: f64,
    /// Peak memory beyond the logits themselves, in bytes: the device pool's growth on wgpu,
    /// the process's peak resident set growth on the CPU.
    pub peak_extra_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LossBench {
    pub rows: usize,
    pub vocab: usize,
    pub device: String,
    pub memory_source: &'static str,
    pub logits_bytes: u64,
    pub fused: LossTiming,
    pub reference: LossTiming,
    /// reference time / fused time.
    pub speedup: f64,
    /// reference extra memory / fused extra memory.
    pub memory_ratio: f64,
}

type LossFn = fn(Tensor<2>, &RowLabels) -> Result<LossSum>;

/// Benchmarks the fused and the reference UAL loss, forward + backward, on `device`.
pub fn loss(
    rows: usize,
    vocab: usize,
    iters: usize,
    device: &Device,
    device_name: &str,
) -> Result<LossBench> {
    let labels = RowLabels::new(
        (0..rows).map(|r| ((r * 7919) % vocab) as u32).collect(),
        (0..rows).map(|r| [0.0, 0.05, 0.1, 0.2][r % 4]).collect(),
        (0..rows).map(|r| r % 8 != 0).collect(),
    )?;
    let memory = MemoryProbe::new(device);
    let fused = time_loss(ual_loss_sum, rows, vocab, iters, &labels, device, &memory)?;
    let reference = time_loss(
        reference::ual_loss_sum,
        rows,
        vocab,
        iters,
        &labels,
        device,
        &memory,
    )?;
    Ok(LossBench {
        rows,
        vocab,
        device: device_name.to_string(),
        memory_source: memory.source(),
        logits_bytes: (rows * vocab * 4) as u64,
        speedup: reference.seconds_per_step / fused.seconds_per_step,
        memory_ratio: reference.peak_extra_bytes as f64 / fused.peak_extra_bytes.max(1) as f64,
        fused,
        reference,
    })
}

fn time_loss(
    loss: LossFn,
    rows: usize,
    vocab: usize,
    iters: usize,
    labels: &RowLabels,
    device: &Device,
    memory: &MemoryProbe,
) -> Result<LossTiming> {
    let device = device.clone().autodiff();
    let values: Vec<f32> = (0..rows * vocab)
        .map(|i| ((i * 2_654_435_761) % 1000) as f32 / 100.0 - 5.0)
        .collect();
    let logits =
        Tensor::<2>::from_data(TensorData::new(values, [rows, vocab]), &device).require_grad();
    let step = || -> Result<f32> {
        let sum = loss(logits.clone(), labels)?.sum;
        let grads = sum.backward();
        let grad = logits.grad(&grads).expect("logits are tracked");
        // Reading one value back waits for every queued kernel.
        Ok(grad.slice([0..1, 0..1]).into_scalar())
    };
    step()?; // Compiles kernels and lets autotune settle.
    memory.reset();
    let baseline = memory.current();
    let start = Instant::now();
    for _ in 0..iters {
        step()?;
    }
    let seconds_per_step = start.elapsed().as_secs_f64() / iters as f64;
    Ok(LossTiming {
        seconds_per_step,
        peak_extra_bytes: memory.peak().saturating_sub(baseline),
    })
}

/// Peak memory: the wgpu pool's reserved bytes, or the process's peak RSS on the CPU.
pub(crate) struct MemoryProbe {
    device: Device,
    pooled: bool,
}

impl MemoryProbe {
    pub(crate) fn new(device: &Device) -> Self {
        Self {
            device: device.clone(),
            pooled: device.memory_pool_usage().is_some(),
        }
    }

    pub(crate) fn source(&self) -> &'static str {
        if self.pooled {
            "device pool bytes_reserved"
        } else {
            "process peak RSS (VmHWM)"
        }
    }

    /// Frees cached pages (wgpu) or restarts the peak-RSS counter (Linux `clear_refs`).
    pub(crate) fn reset(&self) {
        if self.pooled {
            self.device.memory_cleanup();
        } else {
            let _ = std::fs::write("/proc/self/clear_refs", "5");
        }
    }

    pub(crate) fn current(&self) -> u64 {
        match self.device.memory_pool_usage() {
            Some(usage) => usage.bytes_reserved,
            None => proc_status_kib("VmRSS:") * 1024,
        }
    }

    pub(crate) fn peak(&self) -> u64 {
        match self.device.memory_pool_usage() {
            Some(usage) => usage.bytes_reserved,
            None => proc_status_kib("VmHWM:") * 1024,
        }
    }
}

pub(crate) fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Decoding speed with and without the KV cache, measured back to back.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeBench {
    pub device: String,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub cached_tokens_per_s: f64,
    pub uncached_tokens_per_s: f64,
    /// cached / uncached.
    pub speedup: f64,
}

/// Greedy-decodes `tokens` tokens after `prompt`, with the cache and without it.
pub fn decode(
    model: &crate::model::Pretrained,
    prompt: &str,
    tokens: usize,
    device: &str,
) -> Result<DecodeBench> {
    use crate::model::generate::{GenerationConfig, generate};
    let ids = model.tokenizer.encode(prompt)?;
    let run = |use_cache: bool| -> Result<f64> {
        let config = GenerationConfig {
            max_new_tokens: tokens,
            use_cache,
            ..Default::default()
        };
        // A short warm-up compiles the kernels of both paths.
        let warm = GenerationConfig {
            max_new_tokens: 2,
            ..config.clone()
        };
        generate(
            &model.model,
            &model.tokenizer,
            &[],
            std::slice::from_ref(&ids),
            &warm,
            |_, _| {},
        )?;
        let start = Instant::now();
        let out = generate(
            &model.model,
            &model.tokenizer,
            &[],
            std::slice::from_ref(&ids),
            &config,
            |_, _| {},
        )?;
        Ok(out[0].ids.len() as f64 / start.elapsed().as_secs_f64())
    };
    let cached = run(true)?;
    let uncached = run(false)?;
    Ok(DecodeBench {
        device: device.to_string(),
        prompt_tokens: ids.len(),
        new_tokens: tokens,
        cached_tokens_per_s: cached,
        uncached_tokens_per_s: uncached,
        speedup: cached / uncached,
    })
}
