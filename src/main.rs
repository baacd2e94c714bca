//! The `ual` command line: parse arguments, call the library, report errors on one line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use ual::device::{self, DeviceSpec};
use ual::eval::score;
use ual::model::Pretrained;

#[derive(Parser)]
#[command(
    name = "ual",
    version,
    about = "Uncertainty-aware fine-tuning of LLaMA-family models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone, Copy)]
struct DeviceArg {
    /// Where to compute: auto (first wgpu adapter, else CPU), cpu, wgpu or wgpu:N.
    #[arg(long, default_value = "auto")]
    device: DeviceSpec,
}

#[derive(Subcommand)]
enum Command {
    /// List the wgpu adapters ual can use.
    Devices {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the log-probability of every token of each text under a model.
    Score {
        /// A Hugging Face model directory (config.json, tokenizer.json, *.safetensors).
        #[arg(long)]
        model: PathBuf,
        /// A PEFT LoRA adapter directory to apply (unmerged).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// A text to score; repeat for several.
        #[arg(
            long = "text",
            required_unless_present = "data",
            conflicts_with = "data"
        )]
        texts: Vec<String>,
        /// A JSONL file in a training schema: prints each line's response NLL and UAL loss.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Samples longer than this are truncated at the response end, as in training.
        #[arg(long, default_value_t = 2048)]
        max_seq_len: usize,
        /// The template for Alpaca and chat lines: alpaca or chat_template.
        #[arg(long, default_value = "alpaca")]
        template: ual::data::template::TemplateKind,
        /// One JSON object per text instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        device: DeviceArg,
    },
    /// Fine-tune with the UAL loss. With no arguments: UAL-LoRA on the bundled tiny model.
    Train {
        /// A TOML configuration; unset keys take the bundled run's defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override one key, e.g. --set optim.lr=1e-3 --set smoothing.loss=sft.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Shorthand for --set device=...
        #[arg(long)]
        device: Option<DeviceSpec>,
        /// Continue the run in this directory from its last checkpoint, with its config.toml.
        #[arg(long, value_name = "RUN_DIR", conflicts_with = "config")]
        resume: Option<PathBuf>,
    },
    /// Fold a LoRA adapter into its base model and write a Hugging Face directory.
    Merge {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: PathBuf,
        /// The new model directory (written whole, or not at all).
        #[arg(long)]
        output: PathBuf,
        #[command(flatten)]
        device: DeviceArg,
    },
    /// Measure performance; prints JSON.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The fused UAL loss against the composed reference, forward + backward, in one run.
    Loss {
        #[arg(long, default_value_t = 1024)]
        rows: usize,
        #[arg(long, default_value_t = 32_000)]
        vocab: usize,
        /// Timed steps per implementation, after one warm-up step.
        #[arg(long, default_value_t = 5)]
        iters: usize,
        #[command(flatten)]
        device: DeviceArg,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Devices { json } => devices(json),
        Command::Train {
            config,
            mut overrides,
            device,
            resume,
        } => {
            if let Some(d) = device {
                overrides.push(format!("device={d}"));
            }
            let config = match &resume {
                Some(dir) => ual::train::TrainConfig::for_resume(dir, &overrides)?,
                None => ual::train::TrainConfig::resolve(config.as_deref(), &overrides)?,
            };
            let summary = ual::train::run(&config, resume.is_some())?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
            Ok(())
        }
        Command::Merge {
            model,
            adapter,
            output,
            device,
        } => {
            let selected = device::select(device.device)?;
            let pretrained =
                Pretrained::load_with_adapter(&model, Some(&adapter), &selected.device)?;
            let dtype =
                ual::model::load::Checkpoint::open(&model)?.dtype("model.embed_tokens.weight")?;
            ual::model::save::save_pretrained(&pretrained.model, &model, &output, dtype)?;
            eprintln!("wrote {} ({dtype:?})", output.display());
            Ok(())
        }
        Command::Bench(BenchCommand::Loss {
            rows,
            vocab,
            iters,
            device,
        }) => {
            let selected = device::select(device.device)?;
            eprintln!("device: {}", selected.description);
            let report = ual::bench::loss(
                rows,
                vocab,
                iters.max(1),
                &selected.device,
                &selected.description,
            )?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Score {
            model,
            adapter,
            texts,
            data,
            max_seq_len,
            template,
            json,
            device,
        } => {
            let selected = device::select(device.device)?;
            eprintln!("device: {}", selected.description);
            let pretrained =
                Pretrained::load_with_adapter(&model, adapter.as_deref(), &selected.device)?;
            if let Some(data) = data {
                let template = ual::data::template::Template::load(template, &model)?;
                return score_data(&pretrained, &template, &data, max_seq_len);
            }
            for text in &texts {
                let scores = score::score_text(&pretrained.model, &pretrained.tokenizer, text)?;
                if json {
                    println!("{}", serde_json::to_string(&scores)?);
                } else {
                    print_score_table(&pretrained, &scores);
                }
            }
            Ok(())
        }
    }
}

/// One JSON line per data line, with the trainer's tokenisation and the paper's ε mapping.
fn score_data(
    pretrained: &Pretrained,
    template: &ual::data::template::Template,
    data: &std::path::Path,
    max_seq_len: usize,
) -> Result<()> {
    use anyhow::Context;
    use ual::data::batch::{Overflow, tokenize};
    let examples = ual::data::formats::read_jsonl(data)?;
    let eos = *pretrained
        .config
        .eos_token_ids
        .first()
        .context("config.json: field `eos_token_id` is required")?;
    let smoothing = ual::uncertainty::SmoothingConfig::default();
    let (samples, _) = tokenize(
        &examples,
        &pretrained.tokenizer,
        template,
        eos,
        &smoothing,
        max_seq_len,
        Overflow::Truncate,
    )
    .with_context(|| data.display().to_string())?;
    let progress = indicatif::ProgressBar::new(samples.len() as u64);
    for sample in &samples {
        let index = examples
            .iter()
            .position(|e| e.line == sample.line)
            .expect("sample from an example");
        let scored = score::score_sample(&pretrained.model, sample, index)?;
        progress.suspend(|| println!("{}", serde_json::to_string(&scored).expect("serialisable")));
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok(())
}

fn devices(json: bool) -> Result<()> {
    let adapters = device::adapters();
    if json {
        println!("{}", serde_json::to_string_pretty(&adapters)?);
        return Ok(());
    }
    if adapters.is_empty() {
        println!(
            "no wgpu adapter found; ual will run on the CPU (on Linux, install mesa-vulkan-drivers)"
        );
        return Ok(());
    }
    println!(
        "{:<6} {:<40} {:<8} {:<14} {:<5} max binding",
        "device", "name", "backend", "type", "f16"
    );
    for a in adapters {
        println!(
            "{:<6} {:<40} {:<8} {:<14} {:<5} {} MiB",
            format!("wgpu:{}", a.index),
            a.name,
            a.backend,
            a.device_type,
            if a.shader_f16 { "yes" } else { "no" },
            a.max_storage_buffer_binding_size >> 20
        );
    }
    Ok(())
}

fn print_score_table(pretrained: &Pretrained, scores: &score::TokenScores) {
    println!("{:>5} {:>7} {:<20} {:>10}", "pos", "id", "token", "logprob");
    for (j, (id, lp)) in scores.ids.iter().zip(&scores.logprobs).enumerate() {
        let lp = lp.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
        println!(
            "{j:>5} {id:>7} {:<20} {lp:>10}",
            pretrained.tokenizer.token_text(*id)
        );
    }
    let total: f32 = scores.logprobs.iter().flatten().sum();
    println!(
        "total logprob {total:.4} over {} predicted tokens\n",
        scores.ids.len().saturating_sub(1)
    );
}
