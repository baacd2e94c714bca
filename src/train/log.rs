//! The run's step log: `metrics.jsonl`, one JSON line a step, and with `tensorboard` the same
//! figures in a TensorBoard event file. A resume keeps both up to its checkpoint's step, byte
//! for byte, and drops what a crash left past it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

use super::StepMetrics;
use super::tensorboard::EventFile;

/// `metrics.jsonl`, and the event file when the run writes one.
pub struct MetricsLog {
    jsonl: File,
    events: Option<EventFile>,
}

impl MetricsLog {
    /// Opens the logs in `run_dir` holding `kept_lines` (the lines of steps up to `kept_step`).
    pub fn open(
        run_dir: &Path,
        kept_lines: &str,
        kept_step: usize,
        tensorboard: bool,
    ) -> Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        crate::util::write_atomic(&path, kept_lines.as_bytes())?;
        let jsonl = OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let events = tensorboard
            .then(|| EventFile::open(run_dir, kept_step))
            .transpose()?;
        Ok(Self { jsonl, events })
    }

    /// Appends one step.
    pub fn append(&mut self, m: &StepMetrics) -> Result<()> {
        writeln!(self.jsonl, "{}", serde_json::to_string(m)?)?;
        self.jsonl.flush()?;
        if let Some(events) = &mut self.events {
            events.write(m.step, scalars(m))?;
        }
        Ok(())
    }
}

/// The step's figures under TensorBoard tags: `train/…` every step, `eval/…` when it evaluated.
fn scalars(m: &StepMetrics) -> Vec<(&'static str, f32)> {
    let mut out = vec![
        ("train/loss", m.loss),
        ("train/nll", m.nll),
        ("train/lr", m.lr),
        ("train/grad_norm", m.grad_norm),
        ("train/tokens_per_s", m.tokens_per_s),
        ("train/mean_eps", m.mean_eps),
    ];
    out.extend(m.eval_loss.map(|v| ("eval/loss", v)));
    out.extend(m.eval_nll.map(|v| ("eval/nll", v)));
    out.extend(m.loss_scale.map(|v| ("train/loss_scale", v)));
    out.into_iter().map(|(tag, v)| (tag, v as f32)).collect()
}
