//! `ual train`: fine-tuning with the UAL loss, LoRA or full, with gradient accumulation
//! normalised by the whole optimizer step's loss tokens (ARCHITECTURE §3).
//!
//! The whole loop is [`run_with`]: open a [`Session`], step it to the end, finish it.

mod checkpoint;
pub mod config;
mod early_stop;
pub mod keys;
mod log;
pub mod loss_scale;
pub mod optim;
pub mod recompute;
pub mod replicas;
mod report;
mod session;
mod step;
mod stream;
mod tensorboard;

use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::data::batch::DataSummary;
pub use config::{Mode, Recompute, Sampling, TrainConfig};
pub use session::{Parts, Session};
pub use step::{
    Evaluation, EvaluationSums, StepGradients, StepPlan, evaluate, evaluation_sums, step_gradients,
};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer steps completed.
    pub step: usize,
    /// The step's UAL loss (smoothing term included).
    pub loss: f64,
    /// The step's plain cross-entropy on the same tokens (ε = 0), comparable across ε.
    #[serde(default)]
    pub nll: f64,
    /// The learning rate the step used.
    pub lr: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens (padding excluded) per second of the step.
    pub tokens_per_s: f64,
    /// The step's mean ε, weighted by response tokens.
    pub mean_eps: f64,
    /// The held-out UAL loss, on steps that evaluate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// The held-out NLL, on steps that evaluate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_nll: Option<f64>,
    /// `precision = "f16"`: the loss scale the step's backward pass used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// The step's scaled gradients overflowed f16: the weights were left as they were and the
    /// scale halved.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// `runs/<name>`.
    pub run_dir: String,
    /// The device, in words.
    pub device: String,
    /// What preparing the training data kept and dropped.
    pub data: DataSummary,
    /// Optimizer steps of the run (fewer than planned when it stopped early).
    pub steps: usize,
    /// The held-out NLL stopped falling for `early_stop_patience` evaluations before the last
    /// planned step.
    pub stopped_early: bool,
    /// The step with the lowest held-out NLL (its weights are in `best/` with `keep_best`).
    pub best_step: Option<usize>,
    /// That lowest held-out NLL.
    pub best_eval_nll: Option<f64>,
    /// Held-out loss of the model before the first step.
    pub initial_eval_loss: Option<f64>,
    /// Held-out NLL of the model before the first step.
    pub initial_eval_nll: Option<f64>,
    /// The first step's training loss (one micro-batch: see `train_nll_first`).
    pub first_loss: f64,
    /// The last step's training loss (one micro-batch: see `train_nll_last`).
    pub last_loss: f64,
    /// The training NLL's mean over the first `nll_window` steps: with length-bucketed or
    /// mixed batches a single step says little.
    pub train_nll_first: f64,
    /// The training NLL's mean over the last `nll_window` steps.
    pub train_nll_last: f64,
    /// Steps in each of those means: a tenth of the run, between 1 and 50.
    pub nll_window: usize,
    /// The last held-out loss.
    pub final_eval_loss: Option<f64>,
    /// The last held-out NLL.
    pub final_eval_nll: Option<f64>,
    /// Mean tokens per second over the steps.
    pub mean_tokens_per_s: f64,
    /// Wall-clock seconds of this process's part of the run.
    pub seconds: f64,
}

impl RunSummary {
    fn new(
        run_dir: &Path,
        device: String,
        data: DataSummary,
        steps: usize,
        initial: Option<Evaluation>,
        history: &[StepMetrics],
        seconds: f64,
    ) -> Self {
        let window = (history.len() / 10).clamp(1, 50).min(history.len());
        Self {
            run_dir: run_dir.display().to_string(),
            device,
            data,
            steps,
            stopped_early: false,
            best_step: None,
            best_eval_nll: None,
            initial_eval_loss: initial.map(|e| e.loss),
            initial_eval_nll: initial.map(|e| e.nll),
            first_loss: history.first().map(|m| m.loss).unwrap_or(f64::NAN),
            last_loss: history.last().map(|m| m.loss).unwrap_or(f64::NAN),
            train_nll_first: mean_nll(&history[..window]),
            train_nll_last: mean_nll(&history[history.len() - window..]),
            nll_window: window,
            final_eval_loss: history.iter().rev().find_map(|m| m.eval_loss),
            final_eval_nll: history.iter().rev().find_map(|m| m.eval_nll),
            mean_tokens_per_s: history.iter().map(|m| m.tokens_per_s).sum::<f64>()
                / history.len().max(1) as f64,
            seconds,
        }
    }
}

/// The mean training NLL of `steps` (NaN for none).
fn mean_nll(steps: &[StepMetrics]) -> f64 {
    steps.iter().map(|m| m.nll).sum::<f64>() / steps.len() as f64
}

/// How a run begins in its directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A new run; a directory that already holds one is refused.
    Fresh,
    /// A new run in place of the one the directory holds (its checkpoints are removed).
    Overwrite,
    /// The directory's run, from its newest complete checkpoint.
    Resume,
    /// [`Start::Resume`] on data that changed since the checkpoint (`--allow-data-change`).
    ResumeOnChangedData,
}

/// The run stopped between steps because its reporter asked it to (Ctrl-C), after writing a
/// checkpoint of the step it had finished.
#[derive(Debug)]
pub struct Interrupted {
    /// Optimizer steps completed and checkpointed.
    pub step: usize,
    /// The run directory, for `--resume`.
    pub run_dir: std::path::PathBuf,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "interrupted after step {}, which is checkpointed; resume with `ual train --resume {}`",
            self.step,
            self.run_dir.display()
        )
    }
}

impl std::error::Error for Interrupted {}

/// What a caller sees of a run as it goes: the CLI's progress bar, or nothing.
pub trait Reporter {
    /// The session is ready; no step has been taken in this process yet.
    fn opened(&mut self, _session: &Session) {}
    /// One optimizer step is done.
    fn stepped(&mut self, _metrics: &StepMetrics) {}
    /// Whether to stop after the step just taken (checkpointed, then [`Interrupted`]).
    fn should_stop(&mut self) -> bool {
        false
    }
    /// The run is finished and exported.
    fn finished(&mut self, _summary: &RunSummary) {}
}

/// A reporter that reports nothing.
pub struct Quiet;

impl Reporter for Quiet {}

/// Trains as `config` says and writes `runs/<name>/`, silently. See [`run_with`].
pub fn run(config: &TrainConfig, resume: bool) -> Result<RunSummary> {
    let start = if resume { Start::Resume } else { Start::Fresh };
    run_with(config, start, &mut Quiet)
}

/// Trains as `config` says and writes `runs/<name>/`, telling `reporter` as it goes. A resumed
/// run continues from the run's last checkpoint and reproduces the losses an uninterrupted run
/// would have had.
pub fn run_with(
    config: &TrainConfig,
    start: Start,
    reporter: &mut dyn Reporter,
) -> Result<RunSummary> {
    let mut session = Session::open(config, start)?;
    reporter.opened(&session);
    while !session.is_done() {
        let metrics = session.step()?;
        reporter.stepped(&metrics);
        // Every rank stops after the same step, if any rank was asked to.
        let mut stop = [f64::from(u8::from(reporter.should_stop()))];
        crate::cluster::world().sum_f64(&mut stop, "agreeing whether to stop");
        if stop[0] > 0.0 && !session.is_done() {
            session.checkpoint()?;
            let (step, run_dir) = (session.steps_done(), config.run_dir());
            return Err(Interrupted { step, run_dir }.into());
        }
    }
    let summary = session.finish()?;
    reporter.finished(&summary);
    Ok(summary)
}

/// Whether `run_dir` holds a complete checkpoint that [`Start::Resume`] can continue from.
pub fn resumable(run_dir: &std::path::Path) -> bool {
    checkpoint::locate(run_dir).is_ok()
}
