//! The `ual` command line: parse arguments, call the library, report errors on one line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use ual::device::{self, DeviceSpec};
use ual::eval::score;
use ual::model::Pretrained;

#[derive(Parser)]
#[command(name = "ual", version, about = "Uncertainty-aware fine-tuning of LLaMA-family models")]
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
        /// A text to score; repeat for several.
        #[arg(long = "text", required = true)]
        texts: Vec<String>,
        /// One JSON object per text instead of a table.
        #[arg(long)]
        json: bool,
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
        Command::Score { model, texts, json, device } => {
            let selected = device::select(device.device)?;
            eprintln!("device: {}", selected.description);
            let pretrained = Pretrained::load(&model, &selected.device)?;
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

fn devices(json: bool) -> Result<()> {
    let adapters = device::adapters();
    if json {
        println!("{}", serde_json::to_string_pretty(&adapters)?);
        return Ok(());
    }
    if adapters.is_empty() {
        println!("no wgpu adapter found; ual will run on the CPU (on Linux, install mesa-vulkan-drivers)");
        return Ok(());
    }
    println!("{:<6} {:<40} {:<8} {:<14} {:<5} max binding", "device", "name", "backend", "type", "f16");
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
        println!("{j:>5} {id:>7} {:<20} {lp:>10}", pretrained.tokenizer.token_text(*id));
    }
    let total: f32 = scores.logprobs.iter().flatten().sum();
    println!("total logprob {total:.4} over {} predicted tokens\n", scores.ids.len().saturating_sub(1));
}
