//! `ual bench`: machine-readable performance figures, measured side by side in one process.

mod attention;
pub mod decode;
pub mod step;

pub use attention::{AttentionBench, AttentionRow, AttentionShape, attention};

use std::time::Instant;

use anyhow::Result;
use burn::tensor::{Device, Tensor, TensorData};
use serde::Serialize;

use crate::loss::{HeadBlocks, LossSum, RowLabels, reference, ual_loss_sum};

/// Time and memory of one implementation at one size.
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    /// Mean seconds per forward + backward, after one warm-up step.
    pub seconds_per_step: f64,
    /// Peak memory beyond the logits themselves, in bytes: the device pool's growth on wgpu,
    /// the process's peak resident set growth on the CPU.
    pub peak_extra_bytes: u64,
}

/// `ual bench loss`: the fused loss against the composed reference.
#[derive(Debug, Clone, Serialize)]
pub struct LossBench {
    /// Rows of logits.
    pub rows: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// The device, in words.
    pub device: String,
    /// Where the memory figures come from.
    pub memory_source: &'static str,
    /// Bytes of one `[rows, V]` f32 logits tensor.
    pub logits_bytes: u64,
    /// The fused kernels.
    pub fused: Timing,
    /// The composed burn reference.
    pub reference: Timing,
    /// reference time / fused time.
    pub speedup: f64,
    /// reference extra memory / fused extra memory.
    pub memory_ratio: f64,
}

type LossFn = fn(Tensor<2>, &RowLabels) -> Result<LossSum>;

/// Spread targets, a mix of smoothing values and one masked row in eight, as training sees.
fn bench_labels(rows: usize, vocab: usize) -> Result<RowLabels> {
    RowLabels::new(
        (0..rows).map(|r| ((r * 7919) % vocab) as u32).collect(),
        (0..rows).map(|r| [0.0, 0.05, 0.1, 0.2][r % 4]).collect(),
        (0..rows).map(|r| r % 8 != 0).collect(),
    )
}

/// Benchmarks the fused and the reference UAL loss, forward + backward, on `device`.
pub fn loss(
    rows: usize,
    vocab: usize,
    iters: usize,
    device: &Device,
    device_name: &str,
) -> Result<LossBench> {
    let labels = bench_labels(rows, vocab)?;
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
) -> Result<Timing> {
    let device = device.clone().autodiff();
    let values: Vec<f32> = (0..rows * vocab)
        .map(|i| ((i * 2_654_435_761) % 1000) as f32 / 100.0 - 5.0)
        .collect();
    let logits =
        Tensor::<2>::from_data(TensorData::new(values, [rows, vocab]), &device).require_grad();
    measure(iters, memory, || {
        let sum = loss(logits.clone(), labels)?.sum;
        let grads = sum.backward();
        let grad = logits.grad(&grads).expect("logits are tracked");
        // Reading one value back waits for every queued kernel.
        Ok(grad.slice([0..1, 0..1]).into_scalar())
    })
}

/// One warm-up call of `step` (kernel compilation, autotune), then `iters` timed ones with the
/// memory peak above what existed before them.
fn measure(
    iters: usize,
    memory: &MemoryProbe,
    mut step: impl FnMut() -> Result<f32>,
) -> Result<Timing> {
    step()?;
    memory.reset();
    let baseline = memory.current();
    let start = Instant::now();
    for _ in 0..iters {
        step()?;
    }
    let seconds_per_step = start.elapsed().as_secs_f64() / iters as f64;
    Ok(Timing {
        seconds_per_step,
        peak_extra_bytes: memory.peak().saturating_sub(baseline),
    })
}

/// The LM head and the loss at one size: the fused linear cross-entropy against the logits
/// followed by the fused loss, forward + backward, with a frozen head (LoRA's case).
#[derive(Debug, Clone, Serialize)]
pub struct HeadBench {
    /// Rows of hidden states.
    pub rows: usize,
    /// Hidden width.
    pub hidden: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// The device, in words.
    pub device: String,
    /// Where the memory figures come from.
    pub memory_source: &'static str,
    /// 2 × rows × V × 4: the logits and their gradient, which the fused head never forms.
    pub logits_and_grad_bytes: u64,
    /// Rows per block of the fused head.
    pub block_rows: usize,
    /// Vocabulary slices of the hidden gradient.
    pub vocab_splits: usize,
    /// The fused linear cross-entropy.
    pub fused: Timing,
    /// Logits, then the fused loss.
    pub unfused: Timing,
    /// unfused time / fused time.
    pub speedup: f64,
    /// unfused extra memory / fused extra memory.
    pub memory_ratio: f64,
}

/// Benchmarks the fused linear cross-entropy against head-then-loss on `device`.
pub fn head(
    rows: usize,
    hidden: usize,
    vocab: usize,
    iters: usize,
    blocks: HeadBlocks,
    device: &Device,
    device_name: &str,
) -> Result<HeadBench> {
    use crate::loss::ual_linear_loss_sum;
    let labels = bench_labels(rows, vocab)?;
    let ad = device.clone().autodiff();
    let matrix = |rows: usize, cols: usize, scale: f32| -> Tensor<2> {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| (((i * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0) * scale)
            .collect();
        Tensor::from_data(TensorData::new(values, [rows, cols]), &ad)
    };
    let states = matrix(rows, hidden, 1.0).require_grad();
    // Stored as the model stores its head: vocabulary-major where the head is split by vocabulary
    // (`Llama::with_vocab_major_head`), row-major otherwise.
    let scale = 2.0 / (hidden as f32).sqrt();
    let weight = match blocks.vocab_splits {
        1 => matrix(hidden, vocab, scale),
        _ => matrix(vocab, hidden, scale).transpose(),
    };
    let memory = MemoryProbe::new(device);
    let read_grad = |sum: Tensor<1>| -> f32 {
        let grad = states
            .grad(&sum.backward())
            .expect("hidden states are tracked");
        grad.slice([0..1, 0..1]).into_scalar()
    };
    let fused = measure(iters, &memory, || {
        let sum = ual_linear_loss_sum(states.clone(), weight.clone(), &labels, blocks)?.sum;
        Ok(read_grad(sum))
    })?;
    let unfused = measure(iters, &memory, || {
        let logits = states.clone().matmul(weight.clone());
        Ok(read_grad(ual_loss_sum(logits, &labels)?.sum))
    })?;
    Ok(HeadBench {
        rows,
        hidden,
        vocab,
        device: device_name.to_string(),
        memory_source: memory.source(),
        logits_and_grad_bytes: (2 * rows * vocab * 4) as u64,
        block_rows: blocks.block_rows,
        vocab_splits: blocks.vocab_splits,
        speedup: unfused.seconds_per_step / fused.seconds_per_step,
        memory_ratio: unfused.peak_extra_bytes as f64 / fused.peak_extra_bytes.max(1) as f64,
        fused,
        unfused,
    })
}

/// Peak memory: the wgpu pool's reserved bytes; on the CPU the bytes the counting allocator
/// saw in use (the `ual` binary), or else the process's peak RSS.
pub(crate) struct MemoryProbe {
    device: Device,
    source: MemorySource,
}

#[derive(Clone, Copy)]
enum MemorySource {
    Pool,
    Allocator,
    Rss,
}

impl MemoryProbe {
    pub(crate) fn new(device: &Device) -> Self {
        let source = if device.memory_pool_usage().is_some() {
            MemorySource::Pool
        } else if crate::alloc::CountingAlloc::active() {
            MemorySource::Allocator
        } else {
            MemorySource::Rss
        };
        Self {
            device: device.clone(),
            source,
        }
    }

    pub(crate) fn source(&self) -> &'static str {
        match self.source {
            MemorySource::Pool => "device pool bytes_reserved",
            MemorySource::Allocator => "heap bytes in use (counting allocator)",
            MemorySource::Rss => "process peak RSS (VmHWM)",
        }
    }

    /// Frees cached pages (wgpu) or restarts the peak counter.
    pub(crate) fn reset(&self) {
        match self.source {
            MemorySource::Pool => self.device.memory_cleanup(),
            MemorySource::Allocator => crate::alloc::CountingAlloc::reset_peak(),
            MemorySource::Rss => {
                let _ = std::fs::write("/proc/self/clear_refs", "5");
            }
        }
    }

    pub(crate) fn current(&self) -> u64 {
        match self.source {
            MemorySource::Pool => self.pool_reserved(),
            MemorySource::Allocator => crate::alloc::CountingAlloc::current() as u64,
            MemorySource::Rss => proc_status_kib("VmRSS:") * 1024,
        }
    }

    pub(crate) fn peak(&self) -> u64 {
        match self.source {
            MemorySource::Pool => self.pool_reserved(),
            MemorySource::Allocator => crate::alloc::CountingAlloc::peak() as u64,
            MemorySource::Rss => proc_status_kib("VmHWM:") * 1024,
        }
    }

    fn pool_reserved(&self) -> u64 {
        self.device
            .memory_pool_usage()
            .map(|u| u.bytes_reserved)
            .unwrap_or(0)
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
