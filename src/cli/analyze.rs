//! `ual analyze`: what training changed in the model.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use ual::data::formats::read_prompts;
use ual::data::template::{Template, TemplateKind};
use ual::eval::{clustering, features};

use super::eval::Protocol;
use super::{DeviceArg, DtypeArgs};

/// `ual analyze`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// How token features cluster by target id. `--protocol ual`: response tokens, silhouette
    /// and intra/inter distance over all classes, without and with the adapter. `--protocol
    /// paper`: the authors' analysis (every prompt position by next-token id, the 42 most
    /// frequent ids, PCA(2) + silhouette for each of the 861 pairs, and their mean).
    Features(FeaturesArgs),
}

/// `ual analyze features`.
#[derive(clap::Args)]
pub struct FeaturesArgs {
    /// A Hugging Face model directory or a GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// A PEFT adapter; with --protocol paper repeat it for one row each (base first).
    #[arg(long = "adapter")]
    adapters: Vec<PathBuf>,
    /// How prompts are written (default: alpaca for ual, vicuna for paper).
    #[arg(long)]
    template: Option<TemplateKind>,
    /// Whose analysis: ual's or the authors'.
    #[arg(long, value_enum, default_value = "ual")]
    protocol: Protocol,
    /// ual: a training-schema JSONL; paper: prompts (LIMA's test split as it ships,
    /// `{"conversations": [prompt]}`, or `instruction`/`prompt`/`messages` lines).
    #[arg(long)]
    data: PathBuf,
    /// ual: response tokens measured (the cost grows with its square).
    #[arg(long, default_value_t = 2000)]
    max_tokens: usize,
    /// paper: prompts are cut to this many tokens.
    #[arg(long, default_value_t = 1024)]
    max_seq_len: usize,
    /// paper: the prompts as they are (BOS + text), without the template.
    #[arg(long)]
    raw: bool,
    /// paper: one JSON object per model on stdout instead of a table.
    #[arg(long)]
    json: bool,
    /// paper: draw this pair's 2-D scatter for each model (token ids A,B) into --output.
    #[arg(long, value_name = "A,B", value_parser = parse_pair)]
    plot: Option<(u32, u32)>,
    /// Directory for the figures and the JSON report.
    #[arg(long, default_value = "runs/features")]
    output: PathBuf,
    #[command(flatten)]
    dtypes: DtypeArgs,
    #[command(flatten)]
    device: DeviceArg,
}

/// Runs the analysis asked for.
pub fn main(command: Command) -> Result<()> {
    let Command::Features(args) = command;
    match args.protocol {
        Protocol::Paper => paper(args),
        Protocol::Ual => ual_features(args),
    }
}

/// ual's analysis: the base model, then base + adapter.
fn ual_features(args: FeaturesArgs) -> Result<()> {
    if args.adapters.len() > 1 {
        bail!("--protocol ual compares the base with one adapter; give one --adapter");
    }
    let selected = args.device.select()?;
    let template = args.template.unwrap_or_default();
    let adapter = args.adapters.first().map(PathBuf::as_path);
    let results = features::compare(
        &args.model,
        adapter,
        template,
        &args.data,
        args.max_tokens,
        &selected.device,
        args.dtypes.resolve(&selected)?,
    )?;
    for q in &results {
        eprintln!(
            "{}: silhouette {:.4}, intra/inter {:.4}",
            q.label, q.silhouette, q.intra_inter_ratio
        );
    }
    println!(
        "{}",
        features::write_report(&results, &args.data, &args.output)?
    );
    Ok(())
}

/// The authors' analysis, one row per model (base first).
fn paper(args: FeaturesArgs) -> Result<()> {
    let selected = args.device.select()?;
    let kind = args.template.unwrap_or(TemplateKind::Vicuna);
    let template = Template::load(kind, &args.model)?;
    let prompts = read_prompts(&args.data)?;
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("cannot create {}", args.output.display()))?;
    let request = clustering::Request {
        model_dir: &args.model,
        adapters: std::iter::once(None)
            .chain(args.adapters.iter().map(|a| Some(a.as_path())))
            .collect(),
        template: &template,
        raw: args.raw,
        prompts: &prompts,
        max_seq_len: args.max_seq_len,
        plot: args.plot.map(|p| (p, args.output.as_path())),
        types: args.dtypes.resolve(&selected)?,
    };
    let results = clustering::analyse_models(&request, &selected.device)?;
    let report = serde_json::to_string_pretty(&results)?;
    ual::util::write_atomic(&args.output.join("clustering.json"), report.as_bytes())?;
    for r in &results {
        if args.json {
            println!("{}", serde_json::to_string(r)?);
        } else {
            let scored = r.pairs.iter().filter(|p| p.silhouette.is_some()).count();
            println!(
                "{:<40} {:>4} pairs  mean silhouette {:.4}",
                r.model, scored, r.mean
            );
        }
    }
    Ok(())
}

/// Two token ids, `A,B`.
fn parse_pair(text: &str) -> Result<(u32, u32), String> {
    let (a, b) = text
        .split_once(',')
        .ok_or_else(|| format!("{text:?}: expected A,B (two token ids)"))?;
    let id = |s: &str| {
        s.trim()
            .parse::<u32>()
            .map_err(|_| format!("{s:?} is not a token id"))
    };
    Ok((id(a)?, id(b)?))
}
