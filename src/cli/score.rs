//! `ual score`: per-token log-probabilities of texts, or per-line losses of a data file.

use std::path::PathBuf;

use anyhow::Result;
use ual::data::template::TemplateKind;
use ual::eval::score::{self, TokenScores};
use ual::model::Pretrained;
use ual::train::TrainConfig;

use super::{DeviceArg, DtypeArgs};

/// `ual score`.
#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model directory (config.json, tokenizer.json, *.safetensors) or a GGUF file.
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
    /// The template for Alpaca and chat lines: auto (the adapter's recorded template, else the
    /// model's chat template, else alpaca), alpaca, chat_template, vicuna or vicuna_lima.
    #[arg(long, default_value = "auto")]
    template: TemplateKind,
    /// With --data: prepare and score the lines as this training configuration would
    /// (template, loss_on, smoothing mapping over the file, spread, reduction, max_seq_len).
    /// --model and --data stand for the file's `model` and `train_data`.
    #[arg(long, requires = "data")]
    config: Option<PathBuf>,
    /// Override a key of --config, as `ual train --set` does.
    #[arg(long = "set", value_name = "KEY=VALUE", requires = "config")]
    overrides: Vec<String>,
    /// One JSON object per text instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    dtypes: DtypeArgs,
    #[command(flatten)]
    device: DeviceArg,
}

/// Scores as asked, one JSON line per data line or a table per text.
pub fn main(args: Args) -> Result<()> {
    let selected = args.device.select()?;
    let pretrained = Pretrained::load_with_adapter_as(
        &args.model,
        args.adapter.as_deref(),
        &selected.device,
        args.dtypes.resolve(&selected)?,
    )?;
    match (&args.data, &args.config) {
        (Some(data), Some(file)) => {
            let config = TrainConfig::resolve(Some(file), &args.config_overrides(data))?;
            let template =
                super::template_for(config.template, &args.model, args.adapter.as_deref())?;
            score::score_file(&pretrained, &config, &template, data, print_line)
        }
        (Some(data), None) => {
            let template =
                super::template_for(args.template, &args.model, args.adapter.as_deref())?;
            score::score_data(&pretrained, &template, data, args.max_seq_len, print_line)
        }
        (None, _) => {
            for text in &args.texts {
                let scores = score::score_text(&pretrained.model, &pretrained.tokenizer, text)?;
                if args.json {
                    println!("{}", serde_json::to_string(&scores)?);
                } else {
                    print_table(&pretrained, &scores);
                }
            }
            Ok(())
        }
    }
}

impl Args {
    /// `--model`, `--data` and an explicit `--template` fill the training file's keys (the
    /// file need not name a model, and scoring needs no other training data), then `--set`.
    fn config_overrides(&self, data: &std::path::Path) -> Vec<String> {
        let mut sets = vec![
            format!("model={}", super::toml_path(&self.model)),
            format!("train_data={}", super::toml_path(data)),
        ];
        if self.template != TemplateKind::Auto {
            sets.push(format!("template={}", self.template.name()));
        }
        sets.extend(self.overrides.iter().cloned());
        sets
    }
}

/// Prints one record as a JSON line.
fn print_line(line: impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string(&line)?);
    Ok(())
}

fn print_table(pretrained: &Pretrained, scores: &TokenScores) {
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
