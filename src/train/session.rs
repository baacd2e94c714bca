//! A training session: the model, its data and its optimizer, stepped one optimizer step at a
//! time. `ual train` and `ual bench step` both drive it, so the bench measures what training runs.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use burn::optim::{AdamWConfig, ModuleOptimizer};
use burn::tensor::Device;

use super::checkpoint::{self, RunCheckpoint};
use super::config::{Mode, TrainConfig};
use super::early_stop::Best;
use super::log::MetricsLog;
use super::loss_scale::Scaler;
use super::replicas::{StepTotals, sum_step};
use super::step::{Evaluation, StepPlan, evaluation_sums, step_gradients};
use super::stream::BatchStream;
use super::{RunSummary, Start, StepMetrics, optim, report};
use crate::cluster::{self, Cluster, shard};
use crate::data::batch::{DataSummary, Sample, prepare};
use crate::data::formats::read_jsonl;
use crate::data::template::Template;
use crate::device::{self, Selected};
use crate::loss::HeadPlan;
use crate::model::{Llama, Pretrained, lora, peft, save};

/// A run in progress. [`Session::open`] prepares it, [`Session::step`] takes one optimizer step,
/// [`Session::finish`] exports what it trained.
pub struct Session {
    config: TrainConfig,
    device: Device,
    description: String,
    model: Llama,
    optimizer: ModuleOptimizer,
    /// How each step's gradients are formed (the head, recomputation, the reduction).
    plan: StepPlan,
    samples: Vec<Sample>,
    eval_samples: Vec<Sample>,
    data: DataSummary,
    stream: BatchStream,
    step: usize,
    steps: usize,
    warmup: usize,
    initial_eval: Option<Evaluation>,
    history: Vec<StepMetrics>,
    /// The lines of `metrics.jsonl` a resume keeps, byte for byte as they were written.
    kept_lines: String,
    /// The data files as this run read them, kept in every checkpoint.
    fingerprints: Vec<checkpoint::Fingerprint>,
    /// `metrics.jsonl` (and the event file), appended to after every step; `None` for a
    /// session without a run directory (benches).
    log: Option<MetricsLog>,
    /// The lowest held-out NLL so far.
    best: Option<Best>,
    /// The run directory's lock, held while the session lives.
    lock: Option<File>,
    /// The job's ranks: each takes a slice of every micro-batch; rank 0 alone writes.
    cluster: &'static Cluster,
    started: Instant,
    /// `precision = "f16"`: the dynamic loss scale.
    scaler: Scaler,
}

/// The model, data and device a session trains with.
pub struct Parts {
    /// The model to train, adapters attached (LoRA) or not (full).
    pub model: Llama,
    /// Training samples.
    pub samples: Vec<Sample>,
    /// Held-out samples; empty for none.
    pub eval_samples: Vec<Sample>,
    /// What preparing the training data kept and dropped.
    pub data: DataSummary,
}

impl Session {
    /// Prepares the run `config` describes in `runs/<name>/`; with `resume`, continues it from
    /// its last checkpoint so that it reproduces the losses an uninterrupted run would have had.
    pub fn open(config: &TrainConfig, start: Start) -> Result<Self> {
        let cluster = cluster::world();
        let run_dir = config.run_dir();
        let new_dir = !run_dir.exists();
        // Rank 0 alone owns the run directory; every rank fails alike if it cannot.
        let claimed = cluster
            .is_root()
            .then(|| claim_run_dir(&run_dir, start))
            .transpose();
        let lock = cluster.agree(claimed, "claiming the run directory")?;
        let opened = Self::open_claimed(config, start, lock);
        if opened.is_err() && new_dir && cluster.is_root() {
            // A run refused before its first step (bad data, a device without the precision)
            // leaves no directory behind; the lock was dropped with the failed session.
            remove_unused_run_dir(&run_dir);
        }
        opened
    }

    /// [`Session::open`] once the run directory is held (`lock`, on rank 0).
    fn open_claimed(config: &TrainConfig, start: Start, lock: Option<File>) -> Result<Self> {
        let resume = matches!(start, Start::Resume | Start::ResumeOnChangedData);
        let cluster = cluster::world();
        let selected = cluster.agree(
            device::select_for_rank(config.device, cluster.local_rank()),
            "choosing each rank's device",
        )?;
        let shared = resume
            .then(|| checkpoint::share(&config.run_dir(), cluster))
            .transpose()?;
        let saved = shared
            .as_ref()
            .map(|c| RunCheckpoint::read(&c.dir))
            .transpose()?;
        if let Some(saved) = &saved {
            same_global_batch(config, saved, cluster)?;
        }
        let device = config
            .gradient_checkpointing
            .autodiff_device(&selected.device);
        device.seed(config.seed);
        let checkpoint_dir = shared.as_ref().map(|c| c.dir.as_path());
        let (pretrained, model) = load_model(config, &selected, &device, checkpoint_dir)?;
        let positions = pretrained.config.max_position_embeddings;
        if config.max_seq_len > positions {
            bail!(
                "`max_seq_len` = {} exceeds the {positions} positions of {}",
                config.max_seq_len,
                config.model.display()
            );
        }
        let kind = config.template.resolve(&config.model);
        if config.template == crate::data::template::TemplateKind::Auto {
            eprintln!("template: {} (template = \"auto\")", kind.name());
        }
        let template = Template::load(kind, &config.model)?;
        let rules = config.sample_rules(pretrained.config.vocab_size);
        let eos = pretrained.config.eos_token_id()?;
        let read = |path: &Path| -> Result<(Vec<Sample>, DataSummary)> {
            prepare(
                &read_jsonl(path)?,
                &pretrained.tokenizer,
                &template,
                eos,
                &rules,
            )
            .with_context(|| path.display().to_string())
        };
        let fingerprints = data_fingerprints(config)?;
        if let Some(saved) = &saved
            && start != Start::ResumeOnChangedData
        {
            checkpoint::Fingerprint::check_unchanged(&saved.data, &fingerprints)?;
        }
        let (samples, data) = read(&config.train_data)?;
        let eval_samples = match &config.eval_data {
            Some(path) => read(path)?.0,
            None => Vec::new(),
        };
        if cluster.is_root() {
            write_config(config)?;
        }
        let parts = Parts {
            model,
            samples,
            eval_samples,
            data,
        };
        let mut session = Self::new(config, parts, &selected)?;
        session.fingerprints = fingerprints;
        match (saved, &shared) {
            (Some(saved), Some(shared)) => session.restore(&shared.dir, &saved)?,
            _ => session.initial_eval = session.evaluate()?,
        }
        if cluster.is_root() {
            session.open_metrics()?;
        }
        session.lock = lock;
        Ok(session)
    }

    /// A session on `parts`, with no run directory: nothing is written until [`Session::finish`].
    pub fn new(config: &TrainConfig, parts: Parts, selected: &Selected) -> Result<Self> {
        if parts.samples.is_empty() {
            bail!("{}: no usable samples", config.train_data.display());
        }
        let vocab = parts.model.config.vocab_size;
        let hidden = parts.model.config.hidden_size;
        let head = HeadPlan::new(
            config.fused_head,
            vocab,
            selected.rows_per_binding(vocab),
            config.head_block_rows,
        )
        .split_vocab(
            config.head_vocab_splits,
            hidden,
            vocab,
            selected.hardware_gpu,
        );
        let cluster = cluster::world();
        let steps = config.total_steps_on(parts.samples.len(), cluster.size());
        Ok(Self {
            device: config
                .gradient_checkpointing
                .autodiff_device(&selected.device),
            description: selected.description.clone(),
            model: head.arrange(parts.model),
            optimizer: adamw(config),
            plan: StepPlan {
                head,
                recompute: config.gradient_checkpointing,
                reduction: config.reduction,
            },
            // One global micro-batch of every rank's samples, which each rank slices: the order
            // one device with `ranks × batch_size` would draw.
            stream: BatchStream::new(
                &parts.samples,
                config.batch_size * cluster.size(),
                config.sampling,
                config.seed,
            ),
            samples: parts.samples,
            eval_samples: parts.eval_samples,
            data: parts.data,
            step: 0,
            steps,
            warmup: config.warmup_steps(steps),
            initial_eval: None,
            history: Vec::new(),
            kept_lines: String::new(),
            fingerprints: Vec::new(),
            log: None,
            best: None,
            lock: None,
            cluster,
            started: Instant::now(),
            scaler: Scaler::new(config.precision),
            config: config.clone(),
        })
    }

    /// Takes one optimizer step and returns its metrics (written to `metrics.jsonl`, with a
    /// checkpoint when one is due).
    pub fn step(&mut self) -> Result<StepMetrics> {
        let config = &self.config;
        let cluster = self.cluster;
        failure_point(cluster, self.step + 1);
        // The random state is a function of the step (and the rank), so a resumed run draws
        // what an uninterrupted one would have drawn (LoRA dropout).
        let rank_stream = (cluster.rank() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.device.seed(
            config
                .seed
                .wrapping_add(self.step as u64 + 1)
                .wrapping_add(rank_stream),
        );
        let started = Instant::now();
        let micro: Vec<Vec<&Sample>> = (0..config.grad_accum)
            .map(|_| {
                let batch = self.stream.next_batch();
                let mine = shard::slice(batch.len(), cluster.rank(), cluster.size());
                batch[mine].iter().map(|&i| &self.samples[i]).collect()
            })
            .collect();
        let totals =
            StepTotals::local(micro.iter().flatten().copied(), config.reduction).global(cluster);
        let loss_scale = self.scaler.scale();
        let divisor = totals.divisor / loss_scale;
        let mut step = step_gradients(&self.model, &micro, &self.device, &self.plan, divisor)?;
        sum_step(&self.model, &mut step, cluster);
        self.scaler.unscale(&self.model, &mut step);
        // A non-finite forward loss is divergence at any loss scale (the scale multiplies only
        // the backward); only a non-finite gradient under a finite loss is an f16 overflow to
        // skip. Stopping here keeps a diverged model out of every later checkpoint.
        self.check_finite(self.step + 1, &[("loss", step.loss)])?;
        let grad_norm = optim::clip(&self.model, &mut step.grads, config.optim.max_grad_norm);
        let applied = self.scaler.update(self.step + 1, grad_norm.is_finite())?;
        let lr = optim::learning_rate(&config.optim, self.warmup, self.step, self.steps);
        let mean_eps = totals.mean_eps();
        if applied {
            self.check_finite(
                self.step + 1,
                &[("loss", step.loss), ("gradient norm", grad_norm)],
            )?;
            self.model = self.optimizer.step(lr, self.model.clone(), step.grads);
        }
        self.step += 1;
        let eval = self
            .eval_due()
            .then(|| self.evaluate())
            .transpose()?
            .flatten();
        if let Some(e) = eval {
            self.check_finite(self.step, &[("held-out loss", e.loss)])?;
            self.observe_best(e.nll)?;
        }
        let metrics = StepMetrics {
            step: self.step,
            loss: step.loss,
            nll: step.nll,
            lr,
            grad_norm,
            tokens_per_s: step.tokens as f64 / started.elapsed().as_secs_f64(),
            mean_eps,
            eval_loss: eval.map(|e| e.loss),
            eval_nll: eval.map(|e| e.nll),
            loss_scale: self.scaler.state().map(|_| loss_scale),
            skipped: !applied,
        };
        self.record(&metrics)?;
        Ok(metrics)
    }

    /// Whether every step has been taken, or the held-out NLL has stopped falling for
    /// `early_stop_patience` evaluations.
    pub fn is_done(&self) -> bool {
        self.step >= self.steps || self.stopped_early()
    }

    /// Whether the run stops before its last step, its patience spent.
    pub fn stopped_early(&self) -> bool {
        Best::exhausted(self.best, self.config.early_stop_patience)
    }

    /// Counts the held-out NLL of the step just taken, keeping its weights in `best/` when it
    /// is the lowest so far.
    fn observe_best(&mut self, eval_nll: f64) -> Result<()> {
        let improved = Best::observe(&mut self.best, self.step, eval_nll);
        if improved && self.config.keep_best && self.log.is_some() && self.cluster.is_root() {
            let dir = self.config.run_dir().join("best");
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            export(&mut self.model, &self.config, &dir)?;
        }
        Ok(())
    }

    /// Optimizer steps taken so far, a resumed run's earlier ones included.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// The run's length in optimizer steps.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The device the session computes on, in words.
    pub fn device_description(&self) -> &str {
        &self.description
    }

    /// What preparing the training data kept and dropped.
    pub fn data(&self) -> &DataSummary {
        &self.data
    }

    /// Held-out samples.
    pub fn eval_samples(&self) -> usize {
        self.eval_samples.len()
    }

    /// The held-out loss before the first step.
    pub fn initial_eval(&self) -> Option<Evaluation> {
        self.initial_eval
    }

    /// The model as trained so far.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// Waits for the device's queued work, so that a timed step is its own.
    pub fn sync(&self) -> Result<()> {
        self.device
            .sync()
            .map_err(|e| anyhow!("device sync: {e:?}"))
    }

    /// Exports the adapter (LoRA) or model (full), draws `loss.svg` and writes `summary.json`.
    /// Only rank 0 writes; the other ranks return the same summary.
    pub fn finish(mut self) -> Result<RunSummary> {
        let stopped_early = self.stopped_early();
        let run_dir = self.config.run_dir();
        let root = self.cluster.is_root();
        if root {
            export(&mut self.model, &self.config, &run_dir)?;
            report::plot_losses(&self.history, self.initial_eval, &run_dir.join("loss.svg"))?;
        }
        let mut summary = RunSummary::new(
            &run_dir,
            self.description,
            self.data,
            self.step,
            self.initial_eval,
            &self.history,
            self.started.elapsed().as_secs_f64(),
        );
        summary.stopped_early = stopped_early;
        (summary.best_step, summary.best_eval_nll) =
            (self.best.map(|b| b.step), self.best.map(|b| b.eval_nll));
        // A run resumed without its held-out set (`--set eval_data=`) reports none: an earlier
        // step's evaluation is not the final one.
        if self.eval_samples.is_empty() {
            (summary.initial_eval_loss, summary.initial_eval_nll) = (None, None);
            (summary.final_eval_loss, summary.final_eval_nll) = (None, None);
            (summary.best_step, summary.best_eval_nll) = (None, None);
        }
        if root {
            crate::util::write_atomic(
                &run_dir.join("summary.json"),
                serde_json::to_string_pretty(&summary)?.as_bytes(),
            )?;
        }
        Ok(summary)
    }

    /// Stops the run at the first non-finite figure: nothing of the diverged state is stepped,
    /// written or exported, and the last checkpoint stays as it was.
    fn check_finite(&self, step: usize, figures: &[(&str, f64)]) -> Result<()> {
        let Some((what, value)) = figures.iter().find(|(_, v)| !v.is_finite()) else {
            return Ok(());
        };
        let every = self.config.checkpoint_every;
        let kept = match every {
            0 => "no checkpoint was written".to_string(),
            _ if step <= every => "no checkpoint was written yet".to_string(),
            _ => format!(
                "the checkpoint of step {} is kept in {}",
                (step - 1) / every * every,
                self.config.run_dir().join("checkpoint").display()
            ),
        };
        bail!(
            "step {step}: the {what} is {value}; training diverged (try a lower optim.lr); nothing was exported and {kept}"
        )
    }

    /// The held-out loss, each rank evaluating its slice of the set.
    fn evaluate(&self) -> Result<Option<Evaluation>> {
        if self.eval_samples.is_empty() {
            return Ok(None);
        }
        let (c, cluster) = (&self.config, self.cluster);
        let mine = shard::slice(self.eval_samples.len(), cluster.rank(), cluster.size());
        let mut sums = evaluation_sums(
            &self.model,
            &self.eval_samples[mine],
            c.batch_size,
            self.plan.head,
            c.reduction,
        )?;
        let mut v = [sums.loss, sums.nll, sums.divisor];
        cluster.sum_f64(&mut v, "the held-out evaluation");
        (sums.loss, sums.nll, sums.divisor) = (v[0], v[1], v[2]);
        Ok(Some(sums.mean()))
    }

    /// Every `eval_every` steps, and always after the last one.
    fn eval_due(&self) -> bool {
        let every = self.config.eval_every;
        (every > 0 && self.step.is_multiple_of(every)) || self.step == self.steps
    }

    /// Appends `metrics` to the log and checkpoints when one is due.
    fn record(&mut self, metrics: &StepMetrics) -> Result<()> {
        self.history.push(metrics.clone());
        let Some(log) = &mut self.log else {
            return Ok(());
        };
        log.append(metrics)?;
        // The last step too: `--resume` of a finished run (to extend it) then continues from
        // where it ended instead of redoing steps under another schedule.
        let every = self.config.checkpoint_every;
        if every > 0 && (self.step.is_multiple_of(every) || self.is_done()) {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Writes a checkpoint of the steps taken so far, for `--resume`.
    pub fn checkpoint(&mut self) -> Result<()> {
        if !self.cluster.is_root() {
            return Ok(());
        }
        if self.log.is_none() {
            bail!("a session without a run directory has nowhere to checkpoint");
        }
        let saved = RunCheckpoint {
            step: self.step,
            epoch: self.stream.epoch,
            position: self.stream.position,
            initial_eval_loss: self.initial_eval.map(|e| e.loss),
            initial_eval_nll: self.initial_eval.map(|e| e.nll),
            ranks: Some(self.cluster.size()),
            batch_size: Some(self.config.batch_size),
            loss_scale: self.scaler.state(),
            data: self.fingerprints.clone(),
            best: self.best,
        };
        checkpoint::save(&mut self.model, &self.optimizer, &self.config, &saved)
    }

    /// Continues from `saved`: the optimizer's moments, the data position and the metrics.
    fn restore(&mut self, dir: &Path, saved: &RunCheckpoint) -> Result<()> {
        let file = dir.join(checkpoint::OPTIMIZER_FILE);
        let optimizer = std::mem::replace(&mut self.optimizer, adamw(&self.config));
        self.optimizer = optimizer
            .load(&file)
            .map_err(|e| anyhow!("{}: {e:?}", file.display()))?;
        self.stream.seek(saved.epoch, saved.position);
        self.step = saved.step;
        self.best = saved.best;
        // A resume without the held-out set (`--set eval_data=`) has no evaluation to report.
        self.initial_eval = saved
            .initial_eval()
            .filter(|_| !self.eval_samples.is_empty());
        self.scaler.restore(saved.loss_scale);
        if self.cluster.is_root() {
            let metrics = self.config.run_dir().join("metrics.jsonl");
            (self.history, self.kept_lines) = checkpoint::metrics_until(&metrics, saved.step)?;
        }
        Ok(())
    }

    /// Drops the steps past the checkpoint (a crash may have left some), keeping the earlier
    /// ones as they were written, and opens the logs for appending.
    fn open_metrics(&mut self) -> Result<()> {
        let (dir, c) = (self.config.run_dir(), &self.config);
        self.log = Some(MetricsLog::open(
            &dir,
            &self.kept_lines,
            self.step,
            c.tensorboard,
        )?);
        Ok(())
    }
}

/// Takes the run directory's lock (so that no other `ual train` writes into it) and, for a
/// fresh run, makes sure it holds no earlier run unless that is to be overwritten.
fn claim_run_dir(run_dir: &Path, start: Start) -> Result<File> {
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let path = run_dir.join(".lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "{} is in use by another `ual train` (it holds {})",
            run_dir.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    let holds_a_run = run_dir.join("config.toml").exists();
    match start {
        Start::Fresh if holds_a_run => bail!(
            "{} holds a run already: --resume it, or pass --overwrite to start it again",
            run_dir.display()
        ),
        Start::Overwrite => {
            // The old run's checkpoints must not be resumed with the new run's settings.
            for name in ["checkpoint", "checkpoint.tmp", "checkpoint.old"] {
                let _ = std::fs::remove_dir_all(run_dir.join(name));
            }
        }
        _ => {}
    }
    Ok(lock)
}

/// The training and held-out files' fingerprints, in that order.
fn data_fingerprints(config: &TrainConfig) -> Result<Vec<checkpoint::Fingerprint>> {
    std::iter::once(&config.train_data)
        .chain(config.eval_data.as_ref())
        .map(|p| checkpoint::Fingerprint::of(p))
        .collect()
}

/// Removes a run directory that this process created for a run that failed before its first
/// step: only what [`Session::open`] writes (the lock, `config.toml`, `metrics.jsonl`), and the
/// directory itself only if nothing else is in it.
fn remove_unused_run_dir(run_dir: &Path) {
    for name in [".lock", "config.toml", "metrics.jsonl"] {
        let _ = std::fs::remove_file(run_dir.join(name));
    }
    let _ = std::fs::remove_dir(run_dir);
}

/// The model to train: LoRA on the base (a resumed run's adapter from its checkpoint), or the
/// base itself for a full fine-tune (a resumed one's checkpointed weights).
fn load_model(
    config: &TrainConfig,
    selected: &Selected,
    device: &Device,
    checkpoint: Option<&Path>,
) -> Result<(Pretrained, Llama)> {
    let source = match (config.mode, checkpoint) {
        (Mode::Full, Some(dir)) => dir.join("model"),
        _ => config.model.clone(),
    };
    if config.mode == Mode::Lora {
        config
            .lora
            .validate_for(&crate::model::read_config(&source)?)?;
    }
    // Stored as the run says while it loads: a quantized base never exists in f32 as a whole.
    let types = config.dtypes().resolve(selected.types())?;
    let pretrained = Pretrained::load_as(&source, device, types)?;
    let base = pretrained.model.clone();
    let model = match (config.mode, checkpoint, &config.init_adapter) {
        (Mode::Lora, None, Some(dir)) => peft::load_initial(base, dir, &config.lora, device)?,
        (Mode::Lora, None, None) => lora::attach(base, &config.lora, config.seed, device),
        (Mode::Lora, Some(dir), _) => peft::load_peft(base, dir, device)?.0,
        (Mode::Full, ..) => base,
    };
    Ok((pretrained, model))
}

/// AdamW as the configuration sets it.
fn adamw(config: &TrainConfig) -> ModuleOptimizer {
    AdamWConfig::new()
        .with_beta_1(config.optim.beta1 as f32)
        .with_beta_2(config.optim.beta2 as f32)
        .with_epsilon(config.optim.eps as f32)
        .with_weight_decay(config.optim.weight_decay as f32)
        .init()
}

/// Writes `config.toml`, which `--resume` reads back.
fn write_config(config: &TrainConfig) -> Result<()> {
    let run_dir = config.run_dir();
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    crate::util::write_atomic(&run_dir.join("config.toml"), config.to_toml()?.as_bytes())
}

/// Test hooks for a job that loses a rank: `UAL_TEST_KILL_RANK=R:S` kills rank R (SIGKILL, as
/// the OOM killer would) as it begins step S; `UAL_TEST_HANG_RANK=R:S` stops it (SIGSTOP, as
/// a hung driver would).
fn failure_point(cluster: &Cluster, step: usize) {
    for (name, signal) in [
        ("UAL_TEST_KILL_RANK", libc::SIGKILL),
        ("UAL_TEST_HANG_RANK", libc::SIGSTOP),
    ] {
        let Ok(target) = std::env::var(name) else {
            continue;
        };
        if target == format!("{}:{step}", cluster.rank()) {
            // SAFETY: signalling this process is what the hook is for.
            unsafe { libc::raise(signal) };
        }
    }
}

/// Refuses to resume with a global micro-batch (ranks × `batch_size`) other than the
/// checkpoint's: the data order, and so every later loss, would differ.
fn same_global_batch(config: &TrainConfig, saved: &RunCheckpoint, cluster: &Cluster) -> Result<()> {
    let ranks = saved.ranks.unwrap_or(1);
    let batch = match saved.batch_size {
        Some(b) => b,
        None => original_batch_size(config)?,
    };
    let now = (cluster.size(), config.batch_size);
    if ranks * batch == now.0 * now.1 {
        return Ok(());
    }
    let product = ranks * batch;
    let fix = match product % now.0 {
        0 => format!("--set batch_size={} on {} rank(s)", product / now.0, now.0),
        _ => format!("a number of ranks that divides {product}"),
    };
    bail!(
        "cannot resume {} on {} rank(s) × batch_size {}: its checkpoint was taken with {ranks} rank(s) × batch_size {batch} = {product} samples per micro-batch, and resuming must keep that product (use {fix})",
        config.run_dir().display(),
        now.0,
        now.1,
    )
}

/// The `batch_size` of the run's config.toml, for checkpoints that did not record theirs.
fn original_batch_size(config: &TrainConfig) -> Result<usize> {
    let file = config.run_dir().join("config.toml");
    Ok(TrainConfig::resolve(Some(&file), &[])?.batch_size)
}

/// Writes the trained weights: `adapter/` (LoRA) or `model/` (full).
fn export(model: &mut Llama, config: &TrainConfig, run_dir: &Path) -> Result<()> {
    match config.mode {
        // One directory swap: a kill between two files never leaves new weights beside an
        // old `adapter_config.json`.
        Mode::Lora => crate::util::write_dir_atomic(&run_dir.join("adapter"), |dir| {
            peft::save_peft(
                model,
                &config.lora,
                &config.model.display().to_string(),
                dir,
            )?;
            peft::save_companions(dir, &config.model, config.template.resolve(&config.model))
        }),
        Mode::Full => {
            let dtype = checkpoint::export_dtype(config)?;
            save::save_pretrained(model, &config.model, &run_dir.join("model"), dtype)
        }
    }
}
