//! `ual train`: fine-tuning with the UAL loss, LoRA or full, with gradient accumulation
//! normalised by the whole optimizer step's response-token count (DESIGN §3).

mod checkpoint;
pub mod config;
pub mod objective;
pub mod optim;
pub mod recompute;
mod report;

use std::fs::OpenOptions;
use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::data::batch::{Batch, DataSummary, Sample, length_buckets, prepare};
use crate::data::formats::read_jsonl;
use crate::data::template::Template;
use crate::device::{self, DeviceSpec};
use crate::loss::Reduction;
use crate::model::{Llama, Pretrained, lora, save};
pub use config::{Checkpointing, Mode, Sampling, TrainConfig};
use objective::{HeadPlan, response_loss};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub mean_eps: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub run_dir: String,
    pub device: String,
    pub data: DataSummary,
    pub steps: usize,
    /// Held-out loss of the model before the first step.
    pub initial_eval_loss: Option<f64>,
    pub first_loss: f64,
    pub last_loss: f64,
    pub final_eval_loss: Option<f64>,
    pub mean_tokens_per_s: f64,
}

/// Batches in a seeded order: length buckets shuffled epoch after epoch, or micro-batches drawn
/// with replacement (the draw is a function of the seed and its index, so a resumed run draws
/// what an uninterrupted one would have).
struct BatchStream {
    buckets: Vec<Vec<usize>>,
    order: Vec<usize>,
    position: usize,
    epoch: u64,
    seed: u64,
    /// `Some((samples, batch_size))` when drawing with replacement.
    replacement: Option<(usize, usize)>,
}

impl BatchStream {
    fn new(samples: &[Sample], batch_size: usize, sampling: Sampling, seed: u64) -> Self {
        let replacement =
            (sampling == Sampling::Replacement).then_some((samples.len(), batch_size.max(1)));
        let mut stream = Self {
            order: Vec::new(),
            buckets: length_buckets(samples, batch_size),
            position: 0,
            epoch: 0,
            seed,
            replacement,
        };
        stream.shuffle();
        stream
    }

    fn shuffle(&mut self) {
        self.order = (0..self.buckets.len()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed.wrapping_add(self.epoch));
        self.order.shuffle(&mut rng);
    }

    /// Continues from a checkpointed position.
    fn seek(&mut self, epoch: u64, position: usize) {
        self.epoch = epoch;
        self.shuffle();
        self.position = position;
    }

    fn next(&mut self) -> Vec<usize> {
        if let Some((samples, batch_size)) = self.replacement {
            use rand::Rng;
            let draw = self.seed ^ (self.position as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut rng = rand::rngs::StdRng::seed_from_u64(draw);
            self.position += 1;
            return (0..batch_size)
                .map(|_| rng.random_range(0..samples))
                .collect();
        }
        if self.position == self.order.len() {
            self.epoch += 1;
            self.position = 0;
            self.shuffle();
        }
        self.position += 1;
        self.buckets[self.order[self.position - 1]].clone()
    }
}

/// Trains as `config` says and writes `runs/<name>/`. With `resume`, it continues from the run's
/// last checkpoint and reproduces the losses an uninterrupted run would have had.
pub fn run(config: &TrainConfig, resume: bool) -> Result<RunSummary> {
    let spec: DeviceSpec = config
        .device
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))?;
    let selected = device::select(spec)?;
    eprintln!("device: {}", selected.description);
    let device = config
        .gradient_checkpointing
        .autodiff_device(&selected.device);
    let frozen_dtype =
        lora::frozen_dtype(&config.base_dtype, selected.shader_f16, selected.is_wgpu)?;
    device.seed(config.seed);
    let run_dir = config.run_dir();
    let checkpoint_dir = run_dir.join("checkpoint");
    let state = if resume {
        Some(checkpoint::read_state(&checkpoint_dir)?)
    } else {
        None
    };

    // A resumed full fine-tune starts from the checkpointed weights; LoRA from the base.
    let source = match (config.mode, &state) {
        (Mode::Full, Some(_)) => checkpoint_dir.join("model"),
        _ => config.model.clone(),
    };
    let Pretrained {
        model,
        tokenizer,
        config: model_config,
        ..
    } = Pretrained::load(&source, &device)?;
    let eos = model_config.eos_token_id()?;
    let mut model = match (config.mode, &state) {
        (Mode::Lora, None) => lora::attach(model, &config.lora, config.seed, &device),
        (Mode::Lora, Some(_)) => lora::load_peft(model, &checkpoint_dir, &device)?.0,
        (Mode::Full, _) => model,
    };
    if frozen_dtype != burn::tensor::DType::F32 {
        model = lora::store_frozen_in(model, frozen_dtype);
    }

    let template = Template::load(config.template, &config.model)?;
    let rules = config.sample_rules(model_config.vocab_size);
    let read = |path: &std::path::Path| -> Result<(Vec<Sample>, DataSummary)> {
        let examples = read_jsonl(path)?;
        prepare(&examples, &tokenizer, &template, eos, &rules)
            .with_context(|| path.display().to_string())
    };
    let (samples, data_summary) = read(&config.train_data)?;
    if samples.is_empty() {
        anyhow::bail!("{}: no usable samples", config.train_data.display());
    }
    let eval_samples = match &config.eval_data {
        Some(path) => read(path)?.0,
        None => Vec::new(),
    };
    let steps = config.total_steps(samples.len());
    let warmup_steps = config.warmup_steps(steps);
    let reduction = config.reduction;
    eprintln!(
        "data: {} samples ({} truncated, {} dropped, {} without uncertainty), {} response tokens; eval {}",
        data_summary.samples,
        data_summary.truncated,
        data_summary.dropped,
        data_summary.without_uncertainty,
        data_summary.response_tokens,
        eval_samples.len()
    );

    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    // No held-out set is written as "", since TOML has no null and a missing key would
    // resume with the default one.
    let mut written = config.clone();
    written
        .eval_data
        .get_or_insert_with(std::path::PathBuf::new);
    crate::util::write_atomic(
        &run_dir.join("config.toml"),
        toml::to_string_pretty(&written)?.as_bytes(),
    )?;
    let head = HeadPlan::new(
        config.fused_head,
        model_config.vocab_size,
        selected.rows_per_binding(model_config.vocab_size),
        config.head_block_rows,
    )
    .split_vocab(
        config.head_vocab_splits,
        model_config.hidden_size,
        model_config.vocab_size,
        selected.hardware_gpu,
    );
    model = head.arrange(model);
    let mut optimizer = AdamWConfig::new()
        .with_beta_1(config.optim.beta1 as f32)
        .with_beta_2(config.optim.beta2 as f32)
        .with_epsilon(config.optim.eps as f32)
        .with_weight_decay(config.optim.weight_decay as f32)
        .init();
    let mut stream = BatchStream::new(&samples, config.batch_size, config.sampling, config.seed);
    let metrics_path = run_dir.join("metrics.jsonl");
    let (first_step, initial_eval_loss, mut history) = match &state {
        Some(state) => {
            optimizer = optimizer
                .load(checkpoint_dir.join(checkpoint::OPTIMIZER_FILE))
                .map_err(|e| {
                    anyhow::anyhow!(
                        "{}: {e:?}",
                        checkpoint_dir.join(checkpoint::OPTIMIZER_FILE).display()
                    )
                })?;
            stream.seek(state.epoch, state.position);
            let history = checkpoint::metrics_until(&metrics_path, state.step)?;
            eprintln!("resuming {} at step {}", run_dir.display(), state.step);
            (state.step, state.initial_eval_loss, history)
        }
        None => (
            0,
            evaluate(&model, &eval_samples, config.batch_size, head, reduction)?,
            Vec::new(),
        ),
    };
    // Rewrite the metrics kept so far: a crash may have left lines past the checkpoint.
    let kept: String = history
        .iter()
        .map(|m| serde_json::to_string(m).map(|l| l + "\n"))
        .collect::<Result<_, _>>()?;
    crate::util::write_atomic(&metrics_path, kept.as_bytes())?;
    let mut metrics_file = OpenOptions::new().append(true).open(&metrics_path)?;

    let progress = ProgressBar::new(steps as u64).with_position(first_step as u64);
    progress.set_style(
        ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} [{elapsed} < {eta}]")
            .expect("static template"),
    );
    for step in first_step..steps {
        // The random state is a function of the step, so a resumed run draws what an
        // uninterrupted one would have drawn (LoRA dropout).
        device.seed(config.seed.wrapping_add(step as u64 + 1));
        let started = Instant::now();
        let micro: Vec<Vec<&Sample>> = (0..config.grad_accum)
            .map(|_| stream.next().iter().map(|&i| &samples[i]).collect())
            .collect();
        let step_tokens: usize = micro.iter().flatten().map(|s| s.response_tokens()).sum();
        let (mut grads, loss_total, tokens) = step_gradients_reduced(
            &model,
            &micro,
            &device,
            head,
            config.gradient_checkpointing,
            reduction,
        )?;
        let grad_norm = optim::global_norm(&model, &grads);
        if config.optim.max_grad_norm > 0.0 && grad_norm > config.optim.max_grad_norm {
            optim::scale_grads(
                &model,
                &mut grads,
                config.optim.max_grad_norm / (grad_norm + 1e-6),
            );
        }
        let lr = optim::learning_rate(&config.optim, warmup_steps, step, steps);
        model = optimizer.step(lr, model, grads);

        let mean_eps = micro
            .iter()
            .flatten()
            .map(|s| s.epsilon * s.response_tokens() as f64)
            .sum::<f64>()
            / step_tokens.max(1) as f64;
        let done = step + 1;
        // Every `eval_every` steps, and always after the last one.
        let eval_loss = ((config.eval_every > 0 && done % config.eval_every == 0) || done == steps)
            .then(|| evaluate(&model, &eval_samples, config.batch_size, head, reduction))
            .transpose()?
            .flatten();
        let metrics = StepMetrics {
            step: done,
            loss: loss_total,
            lr,
            grad_norm,
            tokens_per_s: tokens as f64 / started.elapsed().as_secs_f64(),
            mean_eps,
            eval_loss,
        };
        writeln!(metrics_file, "{}", serde_json::to_string(&metrics)?)?;
        metrics_file.flush()?;
        progress.set_message(format!(
            "loss {:.4} {:.0} tok/s",
            metrics.loss, metrics.tokens_per_s
        ));
        progress.inc(1);
        history.push(metrics);
        if config.checkpoint_every > 0 && done % config.checkpoint_every == 0 && done < steps {
            let state = checkpoint::State {
                step: done,
                epoch: stream.epoch,
                position: stream.position,
                initial_eval_loss,
            };
            checkpoint::save(&mut model, &optimizer, config, &state)?;
        }
    }
    progress.finish();

    match config.mode {
        Mode::Lora => lora::save_peft(
            &mut model,
            &config.lora,
            &config.model.display().to_string(),
            &run_dir.join("adapter"),
        )?,
        Mode::Full => {
            let dtype = checkpoint::export_dtype(config)?;
            save::save_pretrained(&model, &config.model, &run_dir.join("model"), dtype)?
        }
    }
    report::plot_losses(&history, &run_dir.join("loss.svg"))?;
    let summary = RunSummary {
        run_dir: run_dir.display().to_string(),
        device: selected.description,
        data: data_summary,
        steps,
        initial_eval_loss,
        first_loss: history.first().map(|m| m.loss).unwrap_or(f64::NAN),
        last_loss: history.last().map(|m| m.loss).unwrap_or(f64::NAN),
        final_eval_loss: history.iter().rev().find_map(|m| m.eval_loss),
        mean_tokens_per_s: history.iter().map(|m| m.tokens_per_s).sum::<f64>()
            / history.len().max(1) as f64,
    };
    crate::util::write_atomic(
        &run_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    Ok(summary)
}

/// The gradients of one optimizer step, accumulated over its micro-batches, with the step's
/// mean loss and its token count (padding excluded).
///
/// Each micro-batch's summed loss is divided by the response-token count of the *whole step*,
/// so k micro-batches give exactly the gradient of one batch holding all of them (DESIGN §3).
///
/// With [`Checkpointing::Layers`] each micro-batch's backward recomputes the decoder layers one
/// at a time (`recompute`); the other strategies live in the autodiff `device`.
pub fn step_gradients(
    model: &Llama,
    micro: &[Vec<&Sample>],
    device: &burn::tensor::Device,
    head: HeadPlan,
    checkpointing: Checkpointing,
) -> Result<(GradientsParams, f64, usize)> {
    step_gradients_reduced(model, micro, device, head, checkpointing, Reduction::Tokens)
}

/// [`step_gradients`] under `reduction`: with [`Reduction::Samples`] each sample's loss tokens
/// weigh 1/n_i and the step's sum is divided by its sample count, so k micro-batches again give
/// exactly the gradient of one batch holding all of them.
pub fn step_gradients_reduced(
    model: &Llama,
    micro: &[Vec<&Sample>],
    device: &burn::tensor::Device,
    head: HeadPlan,
    checkpointing: Checkpointing,
    reduction: Reduction,
) -> Result<(GradientsParams, f64, usize)> {
    let scale: f64 = micro.iter().flatten().map(|s| s.share(reduction)).sum();
    let scale = if scale > 0.0 { scale } else { 1.0 };
    let mut accumulator = GradientsAccumulator::new();
    let (mut loss_total, mut tokens) = (0.0, 0);
    for batch_samples in micro {
        let batch = Batch::with_reduction(batch_samples, reduction, device)?;
        tokens += batch.tokens;
        let loss = if checkpointing == Checkpointing::Layers {
            recompute::accumulate_gradients(model, &batch, head, scale, &mut accumulator)?
        } else {
            let loss = response_loss(model, &batch, head)?.sum.div_scalar(scale);
            let value = loss.clone().into_scalar::<f32>();
            accumulator.accumulate(model, GradientsParams::from_grads(loss.backward(), model));
            value
        };
        loss_total += loss as f64;
    }
    Ok((accumulator.grads(), loss_total, tokens))
}

/// Mean UAL loss over `samples` under `reduction` (per loss token, or per sample), without
/// gradients or dropout.
pub fn evaluate(
    model: &Llama,
    samples: &[Sample],
    batch_size: usize,
    head: HeadPlan,
    reduction: Reduction,
) -> Result<Option<f64>> {
    if samples.is_empty() {
        return Ok(None);
    }
    let model = model.valid();
    let device = model.device();
    let mut sum = 0.0;
    for bucket in length_buckets(samples, batch_size) {
        let batch_samples: Vec<&Sample> = bucket.iter().map(|&i| &samples[i]).collect();
        let batch = Batch::with_reduction(&batch_samples, reduction, &device)?;
        sum += response_loss(&model, &batch, head)?
            .sum
            .into_scalar::<f32>() as f64;
    }
    let divisor: f64 = samples.iter().map(|s| s.share(reduction)).sum();
    Ok(Some(sum / divisor.max(1.0)))
}
