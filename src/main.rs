//! The `ual` command line: one module per command under `cli/`; errors end the process with
//! one line on stderr and a non-zero status.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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

#[derive(Subcommand)]
enum Command {
    /// List the wgpu adapters ual can use.
    Devices(cli::devices::Args),
    /// Print the log-probability of every token of each text under a model.
    Score(cli::score::Args),
    /// Fine-tune with the UAL loss. With no arguments: UAL-LoRA on the bundled tiny model.
    Train(cli::train::Args),
    /// Fold a LoRA adapter into its base model and write a Hugging Face directory or a GGUF file.
    Merge(cli::merge::Args),
    /// Write a PEFT LoRA adapter as llama.cpp's LoRA GGUF (llama-cli --lora, Ollama's ADAPTER).
    Export(cli::export::Args),
    /// Continue prompts with a model, streaming the text as it is produced.
    Generate(cli::generate::Args),
    /// Add an `uncertainty` score to each JSONL line, from an LLM endpoint or a local model.
    Annotate(cli::annotate::Args),
    /// Evaluate a model; writes JSON.
    #[command(subcommand)]
    Eval(cli::eval::Command),
    /// UAL vs SFT vs fixed smoothing: every arm × seed trained and measured, then REPORT.md.
    Study(cli::study::Args),
    /// Analyses of what training changed in the model.
    #[command(subcommand)]
    Analyze(cli::analyze::Command),
    /// Measure performance; prints JSON.
    #[command(subcommand)]
    Bench(cli::bench::Command),
}

/// Exact heap figures for `ual bench` on the CPU; the counting costs two relaxed atomics.
#[global_allocator]
static ALLOCATOR: ual::alloc::CountingAlloc = ual::alloc::CountingAlloc;

fn main() -> ExitCode {
    cli::quiet_window_system_probes();
    let cli = Cli::parse();
    // Kept to the end: leaving an MPI job (`MPI_Finalize`) when it drops.
    let _job = match ual::cluster::init() {
        Ok(job) => job,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let cluster = ual::cluster::world();
    let result = match cli.command {
        Command::Devices(args) => cli::devices::main(args),
        Command::Score(args) => cli::score::main(args),
        Command::Train(args) => cli::train::main(args),
        Command::Merge(args) => cli::merge::main(args),
        Command::Export(args) => cli::export::main(args),
        Command::Generate(args) => cli::generate::main(args),
        Command::Annotate(args) => cli::annotate::main(args),
        Command::Eval(command) => cli::eval::main(command),
        Command::Study(args) => cli::study::main(args),
        Command::Analyze(command) => cli::analyze::main(command),
        Command::Bench(command) => cli::bench::main(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // 128 + SIGINT, as a shell reports a run stopped by Ctrl-C.
        Err(err) if err.is::<ual::train::Interrupted>() => {
            if cluster.is_root() {
                eprintln!("{err}");
            }
            ExitCode::from(130)
        }
        Err(err) => {
            eprintln!("error: {}", cluster.label(&format!("{err:#}")));
            // A rank of a job in trouble does not wait in MPI_Finalize for ranks that may be
            // dead; mpirun ends the others.
            cluster.exit_after_error(1);
            ExitCode::FAILURE
        }
    }
}
