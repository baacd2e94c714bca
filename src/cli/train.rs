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
}

/// Trains, then prints the run's summary as JSON on stdout.
pub fn main(mut args: Args) -> Result<()> {
    if let Some(d) = args.device {
        args.overrides.push(format!("device={d}"));
    }
    if let Some(b) = args.base_dtype {
        args.overrides.push(format!("base_dtype={b}"));
    }
    let config = match &args.resume {
        Some(dir) => TrainConfig::for_resume(dir, &args.overrides)?,
        None => TrainConfig::resolve(args.config.as_deref(), &args.overrides)?,
    };
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

/// A progress bar over the steps, and the run told in words at both ends.
struct Progress {
    bar: ProgressBar,
    output: &'static str,
}

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
        Self { bar, output }
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
        if let Some(eval) = session.initial_eval() {
            eprintln!("held-out NLL before training: {:.3}", eval.nll);
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
            _ => "no held-out set".to_string(),
        };
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
