//! `ual bench step`: one LoRA training step of a named model size, on random weights and
//! random tokens, so that anyone can measure it without a download. `scripts/bench_torch.py`
//! runs the same model, batch, LoRA and loss with PyTorch + PEFT and prints the same JSON.

use std::time::Instant;

use anyhow::Result;
use clap::ValueEnum;
use serde::Serialize;

use super::proc_status_kib;
use crate::alloc::CountingAlloc;
use crate::data::batch::{DataSummary, Sample};
use crate::device::Selected;
use crate::model::config::ModelConfig;
use crate::model::load::{RandomWeights, load_llama};
use crate::model::lora::{self, LoraConfig};
use crate::model::precision::{self, BaseDtype, Precision};
use crate::train::{Mode, Parts, Recompute, Session, TrainConfig};

/// Model sizes, LLaMA-shaped, with a 32,000-token vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// The bundled `models/tiny` shape: 2 layers, 64 wide.
    Tiny,
    /// 4 layers, 256 wide (≈ 19 M parameters, most of them in embeddings and head).
    Small,
    /// 12 layers, 768 wide, as GPT-2 small / OPT-125m (≈ 134 M).
    #[value(name = "125m")]
    #[serde(rename = "125m")]
    M125,
    /// TinyLlama-1.1B's shape: 22 layers, 2048 wide, 4 KV heads.
    #[value(name = "1b")]
    #[serde(rename = "1b")]
    B1,
    /// Llama-2-7B's shape: 32 layers, 4096 wide, 32 heads (the paper's models).
    #[value(name = "7b")]
    #[serde(rename = "7b")]
    B7,
}

/// What one preset trains on: the model and the batch.
#[derive(Debug, Clone, Serialize)]
pub struct PresetShape {
    /// Hidden width.
    pub hidden_size: usize,
    /// SwiGLU width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Whether the head is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Sequences per step.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
}

impl Preset {
    /// The model and batch this preset measures.
    pub fn shape(self) -> PresetShape {
        let (hidden, inter, layers, heads, kv, tied, batch, seq) = match self {
            Preset::Tiny => (64, 172, 2, 4, 2, true, 8, 256),
            Preset::Small => (256, 688, 4, 4, 4, false, 4, 256),
            Preset::M125 => (768, 2048, 12, 12, 12, false, 4, 512),
            Preset::B1 => (2048, 5632, 22, 32, 4, false, 4, 512),
            Preset::B7 => (4096, 11008, 32, 32, 32, false, 1, 512),
        };
        PresetShape {
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            vocab_size: 32_000,
            tie_word_embeddings: tied,
            batch_size: batch,
            seq_len: seq,
        }
    }
}

impl PresetShape {
    /// This batch shape on a real model's architecture.
    fn of_model(self, c: &ModelConfig) -> Self {
        Self {
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads,
            vocab_size: c.vocab_size,
            tie_word_embeddings: c.tie_word_embeddings,
            ..self
        }
    }

    /// The shape as a Hugging Face `config.json`, which is what both benches build from.
    pub fn config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": self.seq_len.max(2048),
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": 1,
            "eos_token_id": 2,
        })
    }
}

/// The memory levers and the loop length of one measurement.
#[derive(Debug, Clone, Serialize)]
pub struct StepOptions {
    /// The fused linear cross-entropy head, or logits then the loss.
    pub fused_head: bool,
    /// Rows per block of the fused head; 0 = the default.
    pub head_block_rows: usize,
    /// Vocabulary slices of the fused head's hidden gradient; 0 = the default for the device.
    pub head_vocab_splits: usize,
    /// What the backward pass recomputes.
    pub gradient_checkpointing: Recompute,
    /// How frozen projection weights are stored: f32 (the compute type), f16, q8_0 or q4_0.
    pub base_dtype: BaseDtype,
    /// What the decoder computes in (`precision`).
    pub precision: Precision,
    /// LoRA rank (α = 2r); 0 trains every weight (full fine-tuning).
    pub lora_r: usize,
    /// Untimed steps first.
    pub warmup_steps: usize,
    /// Timed steps.
    pub steps: usize,
    /// Overrides the preset's batch shape.
    pub batch_size: Option<usize>,
    /// Overrides the preset's sequence length.
    pub seq_len: Option<usize>,
    /// A real model to train instead of the preset's random weights.
    pub model: Option<std::path::PathBuf>,
}

/// The JSON line `ual bench step` and `scripts/bench_torch.py` both print.
#[derive(Debug, Clone, Serialize)]
pub struct StepBench {
    /// `ual` and its version.
    pub engine: String,
    /// The model size measured.
    pub preset: Preset,
    /// The device, in words.
    pub device: String,
    /// The model and batch.
    pub shape: PresetShape,
    /// The levers the measurement was taken with.
    pub options: StepOptions,
    /// Parameters of the base model, adapters not included.
    pub parameters: usize,
    /// Parameters that train (the adapters).
    pub trainable_parameters: usize,
    /// Tokens in one step's batch.
    pub tokens_per_step: usize,
    /// Mean seconds per timed step.
    pub seconds_per_step: f64,
    /// Tokens per second over the timed steps.
    pub tokens_per_s: f64,
    /// The wgpu memory pool's reserved bytes at their highest after a step; `None` on the CPU.
    pub peak_device_bytes: Option<u64>,
    /// The process's peak resident set (VmHWM), weights included.
    pub peak_rss_bytes: u64,
    /// The most heap bytes in use at once, weights included (the `ual` binary's counting
    /// allocator; `None` elsewhere). Exact, unlike RSS, which keeps freed pages.
    pub peak_heap_bytes: Option<u64>,
    /// The last step's loss.
    pub final_loss: f64,
    /// Ranks of the job (`mpirun -np`), each with a whole batch of the preset's shape.
    pub ranks: usize,
    /// Milliseconds per timed step spent summing the gradients over the ranks: read-back,
    /// all-reduce and upload, the wait for the slowest rank excluded. 0 on one rank.
    pub allreduce_ms_per_step: f64,
    /// Milliseconds per timed step this rank (0) waited at the all-reduce for the others.
    pub allreduce_wait_ms_per_step: f64,
    /// Bytes each rank sends into one step's all-reduce.
    pub allreduce_bytes: u64,
}

/// `ual bench step --ranks`: the same step on 1, 2, … ranks, side by side.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Scaling {
    /// One measurement per rank count.
    pub ranks: Vec<ScalingPoint>,
}

/// One rank count's step.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ScalingPoint {
    /// Ranks.
    pub ranks: usize,
    /// Tokens per second over all ranks.
    pub tokens_per_s: f64,
    /// `tokens_per_s` over the one-rank figure, when one rank was measured.
    pub speedup: Option<f64>,
    /// Seconds per step.
    pub seconds_per_step: f64,
    /// Milliseconds per step summing the gradients (waiting excluded).
    pub allreduce_ms_per_step: f64,
    /// Milliseconds per step rank 0 waited for the slowest rank.
    pub allreduce_wait_ms_per_step: f64,
    /// The all-reduce's share of the step.
    pub allreduce_share: f64,
    /// Bytes each rank sends per step.
    pub allreduce_bytes: u64,
    /// The devices, in words (rank 0's).
    pub device: String,
}

/// Runs `warmup_steps + steps` LoRA steps of `preset` through a training [`Session`] (the
/// optimizer, clipping and schedule `ual train` uses) and reports the timed ones.
pub fn run(preset: Preset, options: StepOptions, selected: &Selected) -> Result<StepBench> {
    let mut shape = preset.shape();
    if let Some(model) = &options.model {
        shape = shape.of_model(&crate::model::read_config(model)?);
    }
    shape.batch_size = options.batch_size.unwrap_or(shape.batch_size);
    shape.seq_len = options.seq_len.unwrap_or(shape.seq_len);
    let config = session_config(&options, &shape);
    let mut session = Session::new(&config, parts(&shape, &config, selected)?, selected)?;
    let trainable = match config.mode {
        Mode::Lora => trainable_params(session.model()),
        Mode::Full => burn::module::Module::num_params(session.model()),
    };
    // Packed projections are constants, not parameters, but are the base's weights all the same.
    let parameters = burn::module::Module::num_params(session.model()) - trainable
        + packed_values(session.model());
    let mut loss = f64::NAN;
    let step = |session: &mut Session| -> Result<f64> {
        let loss = session.step()?.loss;
        // The optimizer's kernels are only queued; waiting for them makes each timed step its
        // own, and leaves no work queued when the process exits (the suspected cause of a rare
        // crash at exit on lavapipe).
        session.sync()?;
        Ok(loss)
    };
    for _ in 0..options.warmup_steps {
        loss = step(&mut session)?;
    }
    let cluster = crate::cluster::world();
    let before = cluster.exchanges();
    let (mut peak_device, mut seconds) = (None::<u64>, 0.0);
    for _ in 0..options.steps {
        let started = Instant::now();
        loss = step(&mut session)?;
        seconds += started.elapsed().as_secs_f64();
        if let Some(usage) = selected.device.memory_pool_usage() {
            peak_device = Some(peak_device.unwrap_or(0).max(usage.bytes_reserved));
        }
    }
    let steps = options.steps.max(1) as f64;
    let exchanged = cluster.exchanges();
    let tokens_per_step = shape.batch_size * shape.seq_len * cluster.size();
    Ok(StepBench {
        engine: format!("ual {}", env!("CARGO_PKG_VERSION")),
        preset,
        device: selected.description.clone(),
        parameters,
        trainable_parameters: trainable,
        tokens_per_step,
        seconds_per_step: seconds / steps,
        tokens_per_s: tokens_per_step as f64 * steps / seconds.max(1e-9),
        peak_device_bytes: peak_device,
        peak_rss_bytes: proc_status_kib("VmHWM:") * 1024,
        peak_heap_bytes: CountingAlloc::active().then(|| CountingAlloc::peak() as u64),
        final_loss: loss,
        ranks: cluster.size(),
        allreduce_ms_per_step: 1e3
            * ((exchanged.seconds - exchanged.waiting) - (before.seconds - before.waiting))
            / steps,
        allreduce_wait_ms_per_step: 1e3 * (exchanged.waiting - before.waiting) / steps,
        allreduce_bytes: (exchanged.bytes - before.bytes) / (exchanged.count - before.count).max(1),
        shape,
        options,
    })
}

/// The training configuration of the measured steps: `ual train`'s defaults, one micro-batch
/// of the whole random batch per step, nothing evaluated or written.
fn session_config(options: &StepOptions, shape: &PresetShape) -> TrainConfig {
    TrainConfig {
        name: "bench-step".into(),
        model: options.model.clone().unwrap_or_else(|| BENCH_RANDOM.into()),
        train_data: "(random tokens)".into(),
        eval_data: None,
        steps: options.warmup_steps + options.steps,
        // Per rank: every rank of an `mpirun` job takes a whole batch of the preset's shape.
        batch_size: shape.batch_size,
        grad_accum: 1,
        max_seq_len: shape.seq_len,
        eval_every: 0,
        checkpoint_every: 0,
        fused_head: options.fused_head,
        head_block_rows: options.head_block_rows,
        head_vocab_splits: options.head_vocab_splits,
        gradient_checkpointing: options.gradient_checkpointing,
        base_dtype: options.base_dtype,
        precision: options.precision,
        mode: match options.lora_r {
            0 => Mode::Full,
            _ => Mode::Lora,
        },
        lora: LoraConfig {
            r: options.lora_r,
            alpha: 2.0 * options.lora_r as f64,
            ..LoraConfig::default()
        },
        ..TrainConfig::default()
    }
}

/// A random-weight model of `shape` with LoRA attached, and its random batch.
fn parts(shape: &PresetShape, config: &TrainConfig, selected: &Selected) -> Result<Parts> {
    let model_config = ModelConfig::from_json(&shape.config_json().to_string())?;
    let device = config
        .gradient_checkpointing
        .autodiff_device(&selected.device);
    device.seed(0);
    let types = config.dtypes().resolve(selected.types())?;
    let model = match &config_model(config) {
        Some(path) => crate::model::Pretrained::load_as(path, &device, types)?.model,
        None => {
            let weights = RandomWeights {
                seed: 0,
                std: 0.02,
                half: Some(burn::tensor::DType::F16),
            };
            precision::prepare(load_llama(&model_config, &weights, &device, types)?, types)
        }
    };
    let model = match config.mode {
        Mode::Full => model,
        Mode::Lora => lora::attach(model, &config.lora, 0, &device),
    };
    let ranks = crate::cluster::world().size();
    let samples = random_samples(shape, model_config.vocab_size, ranks);
    Ok(Parts {
        model,
        data: DataSummary {
            samples: samples.len(),
            ..DataSummary::default()
        },
        samples,
        eval_samples: Vec::new(),
    })
}

/// The real model a measurement trains, if any (`TrainConfig::model` is the bench's marker).
fn config_model(config: &TrainConfig) -> Option<std::path::PathBuf> {
    (config.model.as_os_str() != BENCH_RANDOM).then(|| config.model.clone())
}

/// `TrainConfig::model` of a measurement on random weights.
const BENCH_RANDOM: &str = "(random weights)";

/// Values of the projections held packed (quantized bases).
fn packed_values(model: &crate::model::Llama) -> usize {
    model
        .projections()
        .filter(|(_, p)| matches!(p.weight, lora::Weight::Packed(_)))
        .map(|(_, p)| p.dims().iter().product::<usize>())
        .sum()
}

fn trainable_params(model: &crate::model::Llama) -> usize {
    let mut model = model.clone();
    let mut total = 0;
    lora::for_each_named(&mut model, |_, proj| {
        if let Some(l) = &proj.lora {
            total += l.a.dims().iter().product::<usize>() + l.b.dims().iter().product::<usize>();
        }
    });
    total
}

/// Seeded random tokens: each sequence's first half is prompt, its second half response, with
/// smoothing alternating between 0.05 and 0.2 (the UAL loss, not plain cross-entropy).
fn random_samples(shape: &PresetShape, vocab: usize, ranks: usize) -> Vec<Sample> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    (0..shape.batch_size * ranks)
        .map(|b| Sample {
            ids: (0..shape.seq_len)
                .map(|_| rng.random_range(3..vocab as u32))
                .collect(),
            loss_mask: (0..shape.seq_len).map(|t| t >= shape.seq_len / 2).collect(),
            epsilon: if b % 2 == 0 { 0.05 } else { 0.2 },
            smoothing: if b % 2 == 0 { 0.05 } else { 0.2 },
            line: b + 1,
            uncertainty: None,
        })
        .collect()
}

impl Scaling {
    /// Collects one `ual bench step` report per rank count (as each job printed it) into the
    /// side-by-side table.
    pub fn from_reports(reports: &[serde_json::Value]) -> Result<Self> {
        let number = |r: &serde_json::Value, key: &str| -> Result<f64> {
            r[key]
                .as_f64()
                .ok_or_else(|| anyhow::anyhow!("a bench step report without `{key}`: {r}"))
        };
        let mut ranks = Vec::new();
        for r in reports {
            let (tokens_per_s, seconds_per_step) =
                (number(r, "tokens_per_s")?, number(r, "seconds_per_step")?);
            let allreduce_ms_per_step = number(r, "allreduce_ms_per_step")?;
            ranks.push(ScalingPoint {
                ranks: number(r, "ranks")? as usize,
                tokens_per_s,
                speedup: None,
                seconds_per_step,
                allreduce_ms_per_step,
                allreduce_wait_ms_per_step: r["allreduce_wait_ms_per_step"].as_f64().unwrap_or(0.0),
                allreduce_share: allreduce_ms_per_step / 1e3 / seconds_per_step.max(1e-12),
                allreduce_bytes: number(r, "allreduce_bytes")? as u64,
                device: r["device"].as_str().unwrap_or_default().to_string(),
            });
        }
        let one = ranks.iter().find(|p| p.ranks == 1).map(|p| p.tokens_per_s);
        for p in &mut ranks {
            p.speedup = one.map(|t| p.tokens_per_s / t);
        }
        Ok(Self { ranks })
    }
}
