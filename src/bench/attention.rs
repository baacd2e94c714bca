//! `ual bench attention`: the attention kernels against the composed burn ops differentiated by
//! autodiff (attention as it ran before them), forward + backward, at several sequence lengths
//! in one run, with each one's peak device memory.

use anyhow::Result;
use burn::tensor::{Device, Tensor, TensorData};
use serde::Serialize;

use super::{MemoryProbe, Timing, measure};
use crate::ops::attention;

/// The attention's shape apart from its length.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AttentionShape {
    /// Sequences.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
}

/// One sequence length.
#[derive(Debug, Clone, Serialize)]
pub struct AttentionRow {
    /// Sequence length.
    pub len: usize,
    /// 4 × batch × heads × len² bytes: one f32 `[len, len]` score matrix per head.
    pub scores_bytes: u64,
    /// The kernels (flash attention on wgpu, the blocked kernel on the CPU).
    pub kernel: Outcome,
    /// The composed burn ops under burn's autodiff.
    pub composed: Outcome,
    /// composed time / kernel time, where both ran.
    pub speedup: Option<f64>,
    /// composed extra memory / kernel extra memory, where both ran.
    pub memory_ratio: Option<f64>,
}

/// A measurement, or why there is none (the composed ops' `[len, len]` scores may not fit in
/// one buffer of the adapter).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// It ran.
    Ran(Timing),
    /// It failed, in words (the device's error, first line).
    Failed(String),
}

impl From<Result<Timing, String>> for Outcome {
    fn from(r: Result<Timing, String>) -> Self {
        match r {
            Ok(t) => Self::Ran(t),
            Err(e) => Self::Failed(e),
        }
    }
}

/// A failure kept as its most telling line: the allocation that did not fit, say.
fn measured(r: Result<Timing>) -> Result<Timing> {
    r.map_err(|e| {
        let text = format!("{e:#}");
        let line = text
            .lines()
            .find(|l| l.contains("allocate") || l.contains("memory"))
            .or_else(|| text.lines().next())
            .unwrap_or("failed")
            .trim()
            .to_string();
        anyhow::anyhow!(line)
    })
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct AttentionBench {
    /// The device, in words.
    pub device: String,
    /// Where the memory figures come from.
    pub memory_source: &'static str,
    /// The shape.
    pub shape: AttentionShape,
    /// One row per length, shortest first.
    pub rows: Vec<AttentionRow>,
}

/// Benchmarks causal attention with its backward at each of `lens` on `device`.
pub fn attention(
    shape: AttentionShape,
    lens: &[usize],
    iters: usize,
    device: &Device,
    device_name: &str,
) -> Result<AttentionBench> {
    let memory = MemoryProbe::new(device);
    let ad = device.clone().autodiff();
    let mut rows = Vec::new();
    for &len in lens {
        let input = |seed: usize, heads: usize| -> Tensor<4> {
            let dims = [shape.batch, heads, len, shape.head_dim];
            let values = (0..dims.iter().product::<usize>())
                .map(|i| (((i + seed) * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0)
                .collect::<Vec<_>>();
            Tensor::from_data(TensorData::new(values, dims), &ad).require_grad()
        };
        let q = input(1, shape.heads);
        let [k, v] = [2, 3].map(|seed| input(seed, shape.kv_heads));
        let step = |f: fn(Tensor<4>, Tensor<4>, Tensor<4>, Option<usize>) -> Tensor<4>| {
            let grads = f(q.clone(), k.clone(), v.clone(), None).sum().backward();
            let grad = q.grad(&grads).expect("q is tracked");
            // Reading one value back waits for every queued kernel, and reports what failed.
            grad.slice([0..1, 0..1, 0..1, 0..1])
                .try_into_scalar::<f32>()
                .map_err(|e| anyhow::anyhow!("{e:?}"))
        };
        let kernel = measured(measure(iters, &memory, || step(attention::causal)));
        let composed = measured(measure(iters, &memory, || step(attention::causal_composed)));
        let ratio = |f: fn(&Timing) -> f64| match (&kernel, &composed) {
            (Ok(k), Ok(c)) => Some(f(c) / f(k).max(f64::MIN_POSITIVE)),
            _ => None,
        };
        rows.push(AttentionRow {
            len,
            scores_bytes: (4 * shape.batch * shape.heads * len * len) as u64,
            speedup: ratio(|t| t.seconds_per_step),
            memory_ratio: ratio(|t| t.peak_extra_bytes.max(1) as f64),
            kernel: kernel.map_err(|e| e.to_string()).into(),
            composed: composed.map_err(|e| e.to_string()).into(),
        });
    }
    Ok(AttentionBench {
        device: device_name.to_string(),
        memory_source: memory.source(),
        shape,
        rows,
    })
}
