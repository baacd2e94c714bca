//! Run checkpoints: everything a run needs to continue exactly where it stopped.
//!
//! `checkpoint/` holds the trainable weights (a PEFT adapter, or a full HF model in f32), the
//! AdamW moments, and `state.json` (step, data position, the held-out loss before training).
//! The learning rate and the random state are functions of the step, so they need no saving.
//! The directory is written under a temporary name and renamed, so a crash at any moment
//! leaves either the previous checkpoint or the new one, never a mixture.

use std::path::Path;

use anyhow::{Context, Result};
use burn::optim::ModuleOptimizer;
use serde::{Deserialize, Serialize};

use super::StepMetrics;
use super::config::{Mode, TrainConfig};
use super::step::Evaluation;
use crate::model::{Llama, lora, save};

pub const OPTIMIZER_FILE: &str = "optimizer.bpk";
const STATE_FILE: &str = "state.json";

/// Where the run stood when the checkpoint was taken (`state.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunCheckpoint {
    /// Optimizer steps completed.
    pub step: usize,
    pub epoch: u64,
    /// Batches consumed in `epoch`.
    pub position: usize,
    /// The held-out loss before the first step.
    pub initial_eval_loss: Option<f64>,
    /// The held-out NLL before the first step.
    #[serde(default)]
    pub initial_eval_nll: Option<f64>,
}

impl RunCheckpoint {
    /// The state of the checkpoint in `checkpoint_dir`.
    pub fn read(checkpoint_dir: &Path) -> Result<Self> {
        read_state(checkpoint_dir)
    }

    /// The held-out evaluation before the first step, as the checkpoint recorded it.
    pub fn initial_eval(&self) -> Option<Evaluation> {
        Some(Evaluation {
            loss: self.initial_eval_loss?,
            nll: self.initial_eval_nll.unwrap_or(f64::NAN),
        })
    }
}

/// Writes `checkpoint/` under a temporary name, then swaps it in.
pub fn save(
    model: &mut Llama,
    optimizer: &ModuleOptimizer,
    config: &TrainConfig,
    state: &RunCheckpoint,
) -> Result<()> {
    let dir = config.run_dir();
    let tmp = dir.join("checkpoint.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    match config.mode {
        Mode::Lora => lora::save_peft(
            model,
            &config.lora,
            &config.model.display().to_string(),
            &tmp,
        )?,
        Mode::Full => save::save_pretrained(
            model,
            &config.model,
            &tmp.join("model"),
            safetensors::Dtype::F32,
        )?,
    }
    optimizer.save(tmp.join(OPTIMIZER_FILE)).map_err(|e| {
        anyhow::anyhow!("cannot write {}: {e:?}", tmp.join(OPTIMIZER_FILE).display())
    })?;
    std::fs::write(tmp.join(STATE_FILE), serde_json::to_string_pretty(state)?)?;
    let final_dir = dir.join("checkpoint");
    let old = dir.join("checkpoint.old");
    let _ = std::fs::remove_dir_all(&old);
    if final_dir.exists() {
        std::fs::rename(&final_dir, &old)?;
    }
    std::fs::rename(&tmp, &final_dir)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

fn read_state(checkpoint_dir: &Path) -> Result<RunCheckpoint> {
    let path = checkpoint_dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot resume: {} not found (no checkpoint was written yet)",
            path.display()
        )
    })?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid checkpoint state", path.display()))
}

/// The metrics of steps `1..=step` from an earlier `metrics.jsonl`.
pub fn metrics_until(path: &Path, step: usize) -> Result<Vec<StepMetrics>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut kept = Vec::new();
    for line in text.lines() {
        // A crash can cut the last line short; such a line lies past the checkpoint anyway.
        match serde_json::from_str::<StepMetrics>(line) {
            Ok(m) if m.step <= step => kept.push(m),
            _ => {}
        }
    }
    Ok(kept)
}

/// The dtype a full fine-tune is exported in: `export_dtype`, or the base checkpoint's.
pub fn export_dtype(config: &TrainConfig) -> Result<safetensors::Dtype> {
    match &config.export_dtype {
        Some(name) => save::dtype_from_torch(Some(name)),
        None => {
            let checkpoint = crate::model::load::SafetensorsFile::open(&config.model)?;
            Ok(match checkpoint.dtype("model.embed_tokens.weight")? {
                d @ (safetensors::Dtype::F16 | safetensors::Dtype::BF16) => d,
                _ => safetensors::Dtype::F32,
            })
        }
    }
}
