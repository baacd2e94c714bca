//! `ual study`: UAL against SFT and fixed label smoothing, arms × seeds, in one command.

use std::path::PathBuf;

use anyhow::{Context, Result};
use ual::study::{self, config::StudyConfig};

/// `ual study`.
#[derive(clap::Args)]
pub struct Args {
    /// The study's TOML (see `studies/mixed-tiny.toml`).
    #[arg(long)]
    config: PathBuf,
}

/// Runs (or resumes) the study and says where its report is.
pub fn main(args: Args) -> Result<()> {
    let config = StudyConfig::load(&args.config)?;
    let source = std::fs::read_to_string(&args.config)
        .with_context(|| format!("cannot read {}", args.config.display()))?;
    let dir = config.dir();
    eprintln!(
        "study {}: {} arms × {} seeds into {}",
        config.name,
        config.arms.len(),
        config.seeds.len(),
        dir.display()
    );
    let progress = indicatif::ProgressBar::new(0);
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {percent:>3}% {msg} [{elapsed_precise} < {eta_precise}]",
        )
        .expect("static template"),
    );
    let results = study::run(&config, &source, &progress)?;
    eprintln!(
        "{} runs measured; wrote {}",
        results.runs.len(),
        dir.join("REPORT.md").display()
    );
    println!("{}", dir.join("results.json").display());
    Ok(())
}
