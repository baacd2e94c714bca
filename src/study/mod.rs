//! `ual study`: does UAL help? One command trains every arm (`sft`, `ls`, `ual`) with every
//! seed from the same base on the same mixed data, measures each run the same way, and
//! writes `REPORT.md`, `results.json` and plots.
//!
//! A study is resumable at every level: a finished run is not retrained, a run cut short
//! resumes from its last checkpoint, a measured run is not measured again, and the judge's
//! cache asks nothing twice. Its settings are fixed in its file before any result exists: a
//! study directory refuses a changed configuration rather than mix two studies' runs.

pub mod config;
pub mod evaluate;
pub mod metrics;
pub mod report;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use crate::llm::Connection;
use crate::model::Pretrained;
use crate::train::{self, Mode, Reporter, Start, StepMetrics, TrainConfig};
use crate::uncertainty::LossKind;
use config::{StudyConfig, arm_name};
use evaluate::{RunEval, RunMetrics, Splits};

/// One arm's run with one seed, measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    /// The arm.
    pub arm: LossKind,
    /// The training seed.
    pub seed: u64,
    /// Its measures.
    pub metrics: RunMetrics,
    /// The judge's preference for this run's open-ended answers over SFT's with the same seed
    /// (wins + ties / 2 over judged prompts); `None` when not judged.
    pub judged_win_rate: Option<f64>,
    /// Held-out NLL against the step, from step 0.
    pub curve: Vec<(usize, f64)>,
}

/// Runs the whole study and writes its report; `progress` covers every step of every run and
/// every unit of measurement.
pub fn run(study: &StudyConfig, source: &str, progress: &ProgressBar) -> Result<report::Results> {
    let dir = study.dir();
    claim(&dir, source)?;
    let splits = Splits::read(&study.eval)?;
    let runs: Vec<(LossKind, u64, TrainConfig)> = study
        .arms
        .iter()
        .flat_map(|&arm| study.seeds.iter().map(move |&seed| (arm, seed)))
        .map(|(arm, seed)| Ok((arm, seed, study.run_config(arm, seed)?)))
        .collect::<Result<_>>()?;
    let work = splits.work(&study.eval);
    let total: usize = runs.iter().map(|(_, _, c)| planned_steps(c) + work).sum();
    progress.set_length(total as u64);
    let mut records = Vec::with_capacity(runs.len());
    for (arm, seed, config) in &runs {
        let label = format!("{} seed {seed}", arm_name(*arm));
        progress.set_message(format!("{label}: training"));
        train_run(config, progress)?;
        progress.set_message(format!("{label}: measuring"));
        let metrics = measure_run(study, &splits, config, progress)?;
        records.push(RunRecord {
            arm: *arm,
            seed: *seed,
            metrics,
            judged_win_rate: None,
            curve: curve(&config.run_dir())?,
        });
    }
    if !study.judge.endpoint.is_empty() {
        progress.set_message("judging");
        progress.suspend(|| judge_all(study, &mut records))?;
    }
    progress.set_message("writing the report");
    let device = crate::device::select(runs[0].2.device)?.description;
    let origin = report::Origin::read(&dir.join("origin.json"))?;
    let results = report::Results::new(study, &records, device, origin);
    report::write(&dir, study, source, &results)?;
    progress.finish_with_message("done");
    Ok(results)
}

/// Makes the study's directory and records its configuration; a directory whose runs were
/// made under another configuration is refused.
fn claim(dir: &Path, source: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let recorded = dir.join("study.toml");
    if let Ok(before) = std::fs::read_to_string(&recorded)
        && before != source
    {
        bail!(
            "{} holds a study made with other settings ({}): a study's settings are fixed before its results exist; give the new one another `name`, or delete the directory",
            dir.display(),
            recorded.display()
        );
    }
    // Where the runs are made, recorded before the first of them (a committed report without
    // its runs, as a fresh clone has it, is made again here).
    if !dir.join("runs").exists() || !dir.join("origin.json").exists() {
        let origin = report::Origin::here();
        let json = serde_json::to_string_pretty(&origin)? + "\n";
        crate::util::write_atomic(&dir.join("origin.json"), json.as_bytes())?;
    }
    crate::util::write_atomic(&recorded, source.as_bytes())
}

/// The optimizer steps the progress bar plans for a run: its `steps`, or one for a run sized
/// by `epochs` (whose session corrects the plan once it knows its data).
fn planned_steps(config: &TrainConfig) -> usize {
    match config.steps {
        0 => 1,
        steps => steps,
    }
}

/// Trains one run unless it has finished; a run cut short resumes from its last checkpoint.
fn train_run(config: &TrainConfig, progress: &ProgressBar) -> Result<()> {
    let run_dir = config.run_dir();
    if run_dir.join("summary.json").exists() {
        progress.inc(planned_steps(config) as u64);
        return Ok(());
    }
    let start = if train::resumable(&run_dir) {
        Start::Resume
    } else if run_dir.join("config.toml").exists() {
        Start::Overwrite
    } else {
        Start::Fresh
    };
    let mut reporter = StudyReporter {
        progress,
        planned: planned_steps(config),
    };
    train::run_with(config, start, &mut reporter)
        .with_context(|| format!("training {}", run_dir.display()))?;
    Ok(())
}

/// Advances the study's bar by each step taken (a resumed run first by the steps it had).
struct StudyReporter<'a> {
    progress: &'a ProgressBar,
    planned: usize,
}

impl Reporter for StudyReporter<'_> {
    fn opened(&mut self, session: &train::Session) {
        let unplanned = session.steps().saturating_sub(self.planned);
        self.progress.inc_length(unplanned as u64);
        self.progress.inc(session.steps_done() as u64);
    }

    fn stepped(&mut self, _metrics: &StepMetrics) {
        self.progress.inc(1);
    }
}

/// The run's measures, from `study-metrics.json` when it was measured before.
fn measure_run(
    study: &StudyConfig,
    splits: &Splits,
    config: &TrainConfig,
    progress: &ProgressBar,
) -> Result<RunMetrics> {
    let run_dir = config.run_dir();
    let saved = run_dir.join("study-metrics.json");
    if let Ok(text) = std::fs::read_to_string(&saved)
        && let Ok(metrics) = serde_json::from_str(&text)
    {
        progress.inc(splits.work(&study.eval) as u64);
        return Ok(metrics);
    }
    let selected = crate::device::select(config.device)?;
    let pretrained = match config.mode {
        Mode::Lora => {
            let adapter = run_dir.join("adapter");
            Pretrained::load_with_adapter(&config.model, Some(&adapter), &selected.device)?
        }
        Mode::Full => Pretrained::load(&run_dir.join("model"), &selected.device)?,
    };
    let position = progress.position();
    let run = RunEval {
        eval: &study.eval,
        splits,
        train: config,
        out_dir: &run_dir,
    };
    let metrics = evaluate::evaluate_run(&pretrained, &run, &mut || progress.inc(1))?;
    // The bar ends each run where its plan says, whatever the measures counted.
    progress.set_position(position + splits.work(&study.eval) as u64);
    crate::util::write_atomic(&saved, serde_json::to_string_pretty(&metrics)?.as_bytes())?;
    Ok(metrics)
}

/// Held-out NLL against the step: the run's initial evaluation, then every one it logged.
fn curve(run_dir: &Path) -> Result<Vec<(usize, f64)>> {
    let summary: serde_json::Value = read_json(&run_dir.join("summary.json"))?;
    let mut points: Vec<(usize, f64)> = summary["initial_eval_nll"]
        .as_f64()
        .map(|v| (0, v))
        .into_iter()
        .collect();
    let metrics = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics)
        .with_context(|| format!("cannot read {}", metrics.display()))?;
    for line in text.lines() {
        let Ok(m) = serde_json::from_str::<StepMetrics>(line) else {
            continue;
        };
        if let Some(nll) = m.eval_nll {
            points.push((m.step, nll));
        }
    }
    Ok(points)
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// Judges each arm's open-ended answers against SFT's with the same seed.
fn judge_all(study: &StudyConfig, records: &mut [RunRecord]) -> Result<()> {
    let judge = &study.judge;
    let connection = Connection {
        endpoint: judge.endpoint.clone(),
        model: judge.model.clone(),
        api_key_env: judge.api_key_env.clone(),
        concurrency: judge.concurrency,
        max_retries: 6,
        timeout: std::time::Duration::from_secs(120),
        retry_base: std::time::Duration::from_millis(500),
        max_wait: crate::llm::client::MAX_WAIT,
    };
    let answers = |arm: LossKind, seed: u64| -> Result<PathBuf> {
        Ok(study
            .run_config(arm, seed)?
            .run_dir()
            .join("high-answers.jsonl"))
    };
    for record in records.iter_mut().filter(|r| r.arm != LossKind::Sft) {
        let name = StudyConfig::run_name(record.arm, record.seed);
        let options = crate::judge::JudgeOptions {
            a: answers(record.arm, record.seed)?,
            b: answers(LossKind::Sft, record.seed)?,
            output: study.dir().join("judge").join(name),
            connection: connection.clone(),
            prompt: judge.prompt.clone(),
            max_tokens: None,
            limit: None,
            resamples: 2000,
            seed: 0,
            retry_failed: false,
        };
        let summary = crate::judge::run(&options)?;
        record.judged_win_rate = Some(summary.rates.preference.value);
    }
    Ok(())
}
