//! `ual train`: fine-tune with the UAL loss, reporting progress on stderr.

use std::path::PathBuf;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::atomic::{AtomicUsize, Ordering};
use ual::device::DeviceSpec;
use ual::model::precision::BaseDtype;

use ual::train::{Mode, Reporter, RunSummary, Session, Start, StepMetrics, TrainConfig};

/// `ual train`.
#[derive(clap::Args)]
pub struct Args {
    /// A TOML configuration; unset keys take the bundled run's defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override one key, e.g. --set optim.lr=1e-3 --set smoothing.loss=sft.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// The model to fine-tune: a Hugging Face directory or a GGUF file (`model`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training JSONL: Alpaca, chat, ShareGPT or prompt/completion lines (`train_data`).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Held-out JSONL, evaluated every `eval_every` steps (`eval_data`).
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// auto (the model's chat template if it has one, else alpaca), alpaca, chat_template,
    /// vicuna or vicuna_lima (`template`).
    #[arg(long)]
    template: Option<String>,
    /// Optimizer steps (`steps`).
    #[arg(long, conflicts_with = "epochs")]
    steps: Option<usize>,
    /// Passes over the training set, instead of --steps (`epochs`).
    #[arg(long)]
    epochs: Option<f64>,
    /// Peak learning rate (`optim.lr`).
    #[arg(long)]
    lr: Option<f64>,
    /// Start from this PEFT adapter's factors instead of fresh ones (`init_adapter`).
    #[arg(long, value_name = "DIR")]
    init_adapter: Option<PathBuf>,
    /// Where run directories are made (`output_dir`).
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// The run's name: it is written to <output-dir>/<name> (`name`).
    #[arg(long)]
    name: Option<String>,
    /// Shorthand for --set device=...
    #[arg(long)]
    device: Option<DeviceSpec>,
    /// Shorthand for --set base_dtype=...: f32, f16, or q8_0/q4_0 (QLoRA on a base quantized
    /// at load into llama.cpp's blocks).
    #[arg(long)]
    base_dtype: Option<BaseDtype>,
    /// Continue the run in this directory from its last checkpoint, with its config.toml.
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "config")]
    resume: Option<PathBuf>,
    /// With --resume: continue although the training or held-out file changed since the
    /// checkpoint (by default a changed file is refused, naming it).
    #[arg(long, requires = "resume")]
    allow_data_change: bool,
    /// Start the run again in a directory that already holds one (its checkpoints are removed).
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Print every configuration key with its value (after --config, --set and the flags) and
    /// one line of help, then exit.
    #[arg(long)]
    print_config: bool,
}

/// Trains, then prints the run's summary as JSON on stdout.
pub fn main(mut args: Args) -> Result<()> {
    let shorthands = args.shorthands();
    args.overrides.extend(shorthands);
    let config = match &args.resume {
        Some(dir) => {
            let config = TrainConfig::for_resume(dir, &args.overrides)?;
            let planned = TrainConfig::for_resume(dir, &[])?;
            if (planned.steps, planned.epochs) != (config.steps, config.epochs) {
                eprintln!(
                    "the run's length changes (steps {} → {}, epochs {} → {}): the learning-rate schedule of the steps still to take follows the new length; the steps taken keep theirs",
                    planned.steps, config.steps, planned.epochs, config.epochs
                );
            }
            config
        }
        None => TrainConfig::resolve(args.config.as_deref(), &args.overrides)?,
    };
    if args.print_config {
        for (key, value, help) in ual::train::keys::keys(&config) {
            println!("{key} = {value}  # {help}");
        }
        return Ok(());
    }
    outside_a_clone(&config)?;
    let start = match (&args.resume, args.overwrite) {
        (Some(_), _) if args.allow_data_change => Start::ResumeOnChangedData,
        (Some(_), _) => Start::Resume,
        (None, true) => Start::Overwrite,
        (None, false) => Start::Fresh,
    };
    stop_on_ctrl_c()?;
    let mut progress = Progress::new(&config);
    let summary = ual::train::run_with(&config, start, &mut progress)?;
    super::print_json(&summary)
}

impl Args {
    /// The flags as `--set` overrides of their keys, applied after the explicit ones.
    fn shorthands(&self) -> Vec<String> {
        let path = |p: &Option<PathBuf>| p.as_deref().map(super::toml_path);
        let keys = [
            ("model", path(&self.model)),
            ("train_data", path(&self.data)),
            ("eval_data", path(&self.eval_data)),
            ("template", self.template.clone()),
            ("steps", self.steps.map(|s| s.to_string())),
            ("epochs", self.epochs.map(|e| format!("{e:?}"))),
            ("optim.lr", self.lr.map(|l| format!("{l:e}"))),
            ("init_adapter", path(&self.init_adapter)),
            ("output_dir", path(&self.output_dir)),
            ("name", self.name.as_deref().map(super::toml_string)),
            ("device", self.device.map(|d| d.to_string())),
            ("base_dtype", self.base_dtype.map(|b| b.to_string())),
        ];
        let mut sets: Vec<String> = keys
            .into_iter()
            .filter_map(|(key, value)| value.map(|v| format!("{key}={v}")))
            .collect();
        if self.steps.is_some() {
            // --steps counts even where the config file counts in epochs.
            sets.push("epochs=0.0".into());
        }
        sets
    }
}

/// The defaults `model` and `train_data` point into ual's repository (the bundled tiny run);
/// elsewhere they do not exist, and the error says which setting to give rather than which
/// file is missing.
fn outside_a_clone(config: &TrainConfig) -> Result<()> {
    let defaults = TrainConfig::default();
    for (given, default, flag) in [
        (
            &config.model,
            &defaults.model,
            "--model (or --set model=...)",
        ),
        (
            &config.train_data,
            &defaults.train_data,
            "--data (or --set train_data=...)",
        ),
    ] {
        if given == default && !given.exists() {
            anyhow::bail!(
                "no model or data given: pass {flag}; the default {} is the bundled tiny run, found only in a clone of ual",
                default.display()
            );
        }
    }
    Ok(())
}

/// `seconds` as `1h02m`, `3m20s` or `45s`.
fn clock(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

/// Ctrl-C presses so far.
static INTERRUPTS: AtomicUsize = AtomicUsize::new(0);

/// The first Ctrl-C lets the step finish and be checkpointed; the second stops at once.
fn stop_on_ctrl_c() -> Result<()> {
    ctrlc::set_handler(|| {
        if INTERRUPTS.fetch_add(1, Ordering::SeqCst) == 0 {
            eprintln!("\nstopping after this step to checkpoint it (Ctrl-C again to stop at once)");
        } else {
            std::process::exit(130);
        }
    })
    .map_err(|e| anyhow::anyhow!("cannot handle Ctrl-C: {e}"))
}

/// A progress bar over the steps on a terminal; elsewhere (a log file, CI, nohup) a line
/// every [`LOG_EVERY_STEPS`]th of the run or [`LOG_EVERY`], and at every evaluation. The run
/// is told in words at both ends.
struct Progress {
    bar: ProgressBar,
    output: &'static str,
    /// The run keeps its best held-out weights in `best/`.
    keep_best: bool,
    /// Lines instead of a bar: stderr is not a terminal.
    lines: Option<Lines>,
}

/// The plain-line log's clock.
struct Lines {
    started: std::time::Instant,
    last: std::time::Instant,
    /// Steps this process has taken (a resumed run's ETA counts only these).
    taken: usize,
    total: usize,
    done_before: usize,
}

/// Without a terminal: a line each twentieth of the run...
const LOG_EVERY_STEPS: usize = 20;
/// ...or each half minute, whichever comes first.
const LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

impl Progress {
    fn new(config: &TrainConfig) -> Self {
        let bar = ProgressBar::hidden();
        bar.set_style(
            ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} [{elapsed} < {eta}]")
                .expect("static template"),
        );
        let output = match config.mode {
            Mode::Lora => "adapter",
            Mode::Full => "model",
        };
        use std::io::IsTerminal;
        let lines = (!std::io::stderr().is_terminal()).then(|| Lines {
            started: std::time::Instant::now(),
            last: std::time::Instant::now(),
            taken: 0,
            total: 0,
            done_before: 0,
        });
        let keep_best = config.keep_best;
        Self {
            bar,
            output,
            keep_best,
            lines,
        }
    }
}

impl Reporter for Progress {
    fn opened(&mut self, session: &Session) {
        let cluster = ual::cluster::world();
        eprintln!(
            "{}",
            cluster.label(&format!("device: {}", session.device_description()))
        );
        if !cluster.is_root() {
            return;
        }
        if cluster.is_parallel() {
            eprintln!(
                "ranks: {}, each a slice of every micro-batch",
                cluster.size()
            );
        }
        let d = session.data();
        eprintln!(
            "data: {} samples ({} truncated, {} dropped, {} without uncertainty), {} response tokens; held out: {}",
            d.samples,
            d.truncated,
            d.dropped,
            d.without_uncertainty,
            d.response_tokens,
            session.eval_samples()
        );
        if session.steps_done() > 0 {
            eprintln!(
                "resuming from step {} of {}",
                session.steps_done(),
                session.steps()
            );
        }
        if session.stopped_early() {
            eprintln!(
                "the run had stopped early, its patience spent: add --set early_stop_patience=0 (or a larger one) to go on"
            );
        }
        if let Some(eval) = session.initial_eval() {
            eprintln!("held-out NLL before training: {:.3}", eval.nll);
        }
        if let Some(lines) = &mut self.lines {
            lines.total = session.steps();
            lines.done_before = session.steps_done();
            return;
        }
        self.bar.set_length(session.steps() as u64);
        self.bar.set_position(session.steps_done() as u64);
        self.bar
            .set_draw_target(indicatif::ProgressDrawTarget::stderr());
    }

    fn stepped(&mut self, m: &StepMetrics) {
        let eval = m
            .eval_nll
            .map(|v| format!(", held-out {v:.3}"))
            .unwrap_or_default();
        if let Some(lines) = &mut self.lines {
            lines.taken += 1;
            let every = lines.total.div_ceil(LOG_EVERY_STEPS).max(1);
            let due = m.step.is_multiple_of(every)
                || m.step == lines.total
                || m.step == lines.done_before + 1
                || m.eval_nll.is_some()
                || lines.last.elapsed() >= LOG_EVERY;
            if due && ual::cluster::world().is_root() {
                let per_step = lines.started.elapsed().as_secs_f64() / lines.taken as f64;
                let eta = per_step * lines.total.saturating_sub(m.step) as f64;
                eprintln!(
                    "step {}/{}: loss {:.3}, nll {:.3}{eval}, {:.0} tok/s, ETA {}",
                    m.step,
                    lines.total,
                    m.loss,
                    m.nll,
                    m.tokens_per_s,
                    clock(eta)
                );
                lines.last = std::time::Instant::now();
            }
            return;
        }
        self.bar.set_message(format!(
            "nll {:.3}{eval}, {:.0} tok/s",
            m.nll, m.tokens_per_s
        ));
        self.bar.inc(1);
    }

    fn should_stop(&mut self) -> bool {
        let stop = INTERRUPTS.load(Ordering::SeqCst) > 0;
        if stop {
            self.bar.finish_and_clear();
        }
        stop
    }

    fn finished(&mut self, s: &RunSummary) {
        self.bar.finish_and_clear();
        if !ual::cluster::world().is_root() {
            return;
        }
        let held_out = match (s.initial_eval_nll, s.final_eval_nll) {
            (Some(a), Some(b)) if a.is_finite() => format!("held-out NLL {a:.2} → {b:.2}"),
            (_, Some(b)) => format!("held-out NLL {b:.2}"),
            _ => format!(
                "training NLL {:.2} → {:.2} (means of the first and last {} steps)",
                s.train_nll_first, s.train_nll_last, s.nll_window
            ),
        };
        if s.stopped_early {
            eprintln!(
                "stopped early: the held-out NLL has not gone below {:.3} (step {}) since",
                s.best_eval_nll.unwrap_or(f64::NAN),
                s.best_step.unwrap_or_default()
            );
        }
        if let (Some(step), true) = (s.best_step, self.keep_best) {
            eprintln!(
                "best held-out NLL at step {step}: {}/best/{}",
                s.run_dir, self.output
            );
        }
        eprintln!(
            "{held_out} over {} steps ({:.1} min, {:.0} tok/s); {}: {}/{}",
            s.steps,
            s.seconds / 60.0,
            s.mean_tokens_per_s,
            self.output,
            s.run_dir,
            self.output
        );
    }
}
