//! `ual bench`: performance measurements, printed as JSON.

use std::path::PathBuf;

use anyhow::Result;
use ual::bench::step::{Preset, StepOptions};
use ual::loss::HeadPlan;
use ual::model::Pretrained;
use ual::model::precision::{BaseDtype, Precision};
use ual::train::Recompute;

use super::DeviceArg;

/// `ual bench`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// The fused UAL loss against the composed reference, forward + backward, in one run.
    Loss(LossArgs),
    /// One LoRA training step of a named model size on random weights, through the trainer's
    /// own session; prints JSON with tokens/s, peak device memory and peak RSS (compare with
    /// scripts/bench_torch.py).
    Step(StepArgs),
    /// The fused linear cross-entropy against logits-then-loss, forward + backward, in one run.
    Head(HeadArgs),
    /// Decoding speed with and without the KV cache, in one run.
    Decode(DecodeArgs),
    /// Causal attention with its backward: the kernels against the composed burn ops under
    /// autodiff, at several sequence lengths in one run, with peak device memory.
    Attention(AttentionArgs),
}

/// `ual bench attention`.
#[derive(clap::Args)]
pub struct AttentionArgs {
    /// Sequence lengths, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [512, 1024, 2048])]
    len: Vec<usize>,
    /// Sequences.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Query heads.
    #[arg(long, default_value_t = 12)]
    heads: usize,
    /// Key/value heads (a divisor of --heads).
    #[arg(long, default_value_t = 12)]
    kv_heads: usize,
    /// Width of a head.
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Timed steps per implementation and length, after one warm-up step.
    #[arg(long, default_value_t = 2)]
    iters: usize,
    #[command(flatten)]
    device: DeviceArg,
}

/// `ual bench loss`.
#[derive(clap::Args)]
pub struct LossArgs {
    /// Rows of logits.
    #[arg(long, default_value_t = 1024)]
    rows: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 32_000)]
    vocab: usize,
    /// Timed steps per implementation, after one warm-up step.
    #[arg(long, default_value_t = 5)]
    iters: usize,
    #[command(flatten)]
    device: DeviceArg,
}

/// `ual bench step`.
#[derive(clap::Args)]
pub struct StepArgs {
    /// The model size.
    #[arg(long, value_enum, default_value = "small")]
    preset: Preset,
    /// A real model (a Hugging Face directory or a GGUF file) instead of the preset's random
    /// weights; the preset still gives the batch shape unless --batch-size/--seq-len do.
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// Compute the logits, then the loss, instead of the fused linear cross-entropy.
    #[arg(long)]
    unfused_head: bool,
    /// Rows per block of the fused head (0: about 8 Mi logits, in whole 128-row tiles).
    #[arg(long, default_value_t = 0)]
    head_block_rows: usize,
    /// Vocabulary slices of the fused head's hidden gradient (0: split on hardware GPUs
    /// only, 1: no split).
    #[arg(long, default_value_t = 0)]
    head_vocab_splits: usize,
    /// Recompute in the backward pass: `layers` (each decoder layer from its input; the
    /// default when the flag has no value), `ops` (burn's balanced strategy) or `off`.
    #[arg(long, default_value = "off", num_args = 0..=1, default_missing_value = "layers")]
    gradient_checkpointing: Recompute,
    /// Store frozen projection weights as f32 (the compute type), f16 (adapters with
    /// SHADER_F16), or quantized into q8_0 or q4_0 blocks.
    #[arg(long, default_value = "f32")]
    base_dtype: BaseDtype,
    /// What the decoder computes in: f32, f16 (SHADER_F16; with the loss scale) or bf16 (CPU,
    /// Metal).
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// LoRA rank (α = 2r); 0 measures full fine-tuning (every weight trains).
    #[arg(long, default_value_t = 16)]
    lora_r: usize,
    /// Untimed steps first (kernel compilation, autotune).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Overrides the preset's batch size.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Overrides the preset's sequence length.
    #[arg(long)]
    seq_len: Option<usize>,
    /// Measure the step on each of these rank counts, one `mpirun -np N` job each (e.g.
    /// `1,2,4`): tokens/s over all ranks and the all-reduce's time. Needs the `mpi` build and
    /// `mpirun` (`UAL_MPIRUN` replaces the launcher command).
    #[arg(long, value_delimiter = ',')]
    ranks: Vec<usize>,
    #[command(flatten)]
    device: DeviceArg,
}

/// `ual bench head`.
#[derive(clap::Args)]
pub struct HeadArgs {
    /// Rows of hidden states.
    #[arg(long, default_value_t = 4096)]
    rows: usize,
    /// Hidden width.
    #[arg(long, default_value_t = 512)]
    hidden: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 32_000)]
    vocab: usize,
    /// Timed steps per implementation.
    #[arg(long, default_value_t = 2)]
    iters: usize,
    /// Rows per block of the fused head; default: about 8 Mi logits, in whole 128-row tiles.
    #[arg(long, alias = "chunk-rows")]
    block_rows: Option<usize>,
    /// Vocabulary slices of the hidden gradient (0: split on hardware GPUs only, 1: none).
    #[arg(long, default_value_t = 0)]
    vocab_splits: usize,
    #[command(flatten)]
    device: DeviceArg,
}

/// `ual bench decode`.
#[derive(clap::Args)]
pub struct DecodeArgs {
    /// A model directory or GGUF file (default: the bundled tiny model, unless --preset).
    #[arg(long, conflicts_with = "preset")]
    model: Option<PathBuf>,
    /// A named shape on random weights instead of a model.
    #[arg(long, value_enum)]
    preset: Option<Preset>,
    /// The prompt decoded from (a model's).
    #[arg(
        long,
        default_value = "Natalia sold clips to 48 of her friends in April",
        conflicts_with = "preset"
    )]
    prompt: String,
    /// Tokens of the random prompt (a preset's).
    #[arg(long, default_value_t = 16, requires = "preset")]
    prompt_tokens: usize,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 100)]
    new_tokens: usize,
    #[command(flatten)]
    dtypes: super::DtypeArgs,
    #[command(flatten)]
    device: DeviceArg,
}

/// Runs one measurement.
pub fn main(command: Command) -> Result<()> {
    match command {
        Command::Loss(a) => {
            let selected = a.device.select()?;
            let report = ual::bench::loss(
                a.rows,
                a.vocab,
                a.iters.max(1),
                &selected.device,
                &selected.description,
            )?;
            super::print_json(&report)
        }
        Command::Step(a) => step(a),
        Command::Head(a) => head(a),
        Command::Attention(a) => attention(a),
        Command::Decode(a) => decode(a),
    }
}

fn decode(a: DecodeArgs) -> Result<()> {
    use ual::bench::decode::{self, DecodeOptions};
    let selected = a.device.select()?;
    let types = a.dtypes.resolve(&selected)?;
    let (name, model, tokenizer, prompt) = match a.preset {
        Some(preset) => {
            let (model, tokenizer) =
                decode::random_model(&preset.shape(), &selected.device, types)?;
            let prompt = decode::random_prompt(a.prompt_tokens, model.config.vocab_size);
            let name = clap::ValueEnum::to_possible_value(&preset)
                .map_or_else(|| format!("{preset:?}"), |v| v.get_name().to_string());
            (format!("{name} (random weights)"), model, tokenizer, prompt)
        }
        None => {
            let dir = a.model.unwrap_or_else(|| PathBuf::from("models/tiny"));
            let pretrained = Pretrained::load_as(&dir, &selected.device, types)?;
            let prompt = pretrained.tokenizer.encode(&a.prompt)?;
            let name = dir.display().to_string();
            (name, pretrained.model, pretrained.tokenizer, prompt)
        }
    };
    let options = DecodeOptions {
        model: name,
        batch_size: a.batch_size,
        new_tokens: a.new_tokens,
    };
    let report = decode::run(&model, &tokenizer, &prompt, &options, &selected.description)?;
    super::print_json(&report)
}

fn step(a: StepArgs) -> Result<()> {
    if !a.ranks.is_empty() {
        return scaling(&a.ranks);
    }
    let selected = a.device.select()?;
    let options = StepOptions {
        fused_head: !a.unfused_head,
        head_block_rows: a.head_block_rows,
        head_vocab_splits: a.head_vocab_splits,
        gradient_checkpointing: a.gradient_checkpointing,
        base_dtype: a.base_dtype,
        precision: a.precision,
        lora_r: a.lora_r,
        warmup_steps: a.warmup,
        steps: a.steps.max(1),
        batch_size: a.batch_size,
        seq_len: a.seq_len,
        model: a.model,
    };
    let report = ual::bench::step::run(a.preset, options, &selected)?;
    if ual::cluster::world().is_root() {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

/// `bench step --ranks`: this same command without `--ranks`, once under `mpirun -np N` for
/// each N, one after the other on the same machine, then their figures side by side.
fn scaling(ranks: &[usize]) -> Result<()> {
    if !cfg!(feature = "mpi") {
        anyhow::bail!(
            "bench step --ranks needs ual built with MPI: cargo build --release --features mpi"
        );
    }
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    strip_ranks(&mut args);
    let exe = std::env::current_exe()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut reports = Vec::new();
    for &n in ranks {
        let mut command = launcher(n)?;
        // The ranks share the machine's cores, as one rank's threads would.
        command.env("RAYON_NUM_THREADS", (cores / n.max(1)).max(1).to_string());
        let out = command
            .arg(&exe)
            .args(&args)
            .stderr(std::process::Stdio::inherit())
            .output()
            .map_err(|e| anyhow::anyhow!("cannot start the MPI launcher: {e}"))?;
        if !out.status.success() {
            anyhow::bail!("bench step on {n} rank(s) failed ({})", out.status);
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .rfind(|l| l.starts_with('{'))
            .unwrap_or_default();
        reports.push(
            serde_json::from_str::<serde_json::Value>(line).map_err(|e| {
                anyhow::anyhow!("bench step on {n} rank(s) printed no report ({e}): {text}")
            })?,
        );
    }
    super::print_json(&ual::bench::step::Scaling::from_reports(&reports)?)
}

/// Removes `--ranks N,…` (or `--ranks=N,…`) from a command line.
fn strip_ranks(args: &mut Vec<String>) {
    if let Some(i) = args.iter().position(|a| a == "--ranks") {
        args.drain(i..(i + 2).min(args.len()));
    }
    args.retain(|a| !a.starts_with("--ranks="));
}

/// `mpirun -np n`: `UAL_MPIRUN` split on spaces, else `mpirun`, with Open MPI's permission to
/// oversubscribe the cores (and to run as root, where this runs as root).
fn launcher(n: usize) -> Result<std::process::Command> {
    let spec = std::env::var("UAL_MPIRUN").unwrap_or_else(|_| "mpirun".into());
    let mut words = spec.split_whitespace();
    let program = words.next().unwrap_or("mpirun");
    let mut command = std::process::Command::new(program);
    command.args(words);
    let version = std::process::Command::new(program)
        .arg("--version")
        .output()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot run `{program}` ({e}): install OpenMPI or MPICH, or set UAL_MPIRUN"
            )
        })?;
    if String::from_utf8_lossy(&version.stdout).contains("Open MPI") {
        command.arg("--oversubscribe");
        // SAFETY: geteuid only reads the process's user id.
        if unsafe { libc::geteuid() } == 0 {
            command.arg("--allow-run-as-root");
        }
    }
    command.args(["-np", &n.to_string()]);
    Ok(command)
}

fn attention(a: AttentionArgs) -> Result<()> {
    if a.kv_heads == 0 || !a.heads.is_multiple_of(a.kv_heads) {
        anyhow::bail!(
            "--kv-heads {} does not divide --heads {}",
            a.kv_heads,
            a.heads
        );
    }
    if a.len.contains(&0) || a.batch == 0 || a.head_dim == 0 {
        anyhow::bail!("--len, --batch and --head-dim must be positive");
    }
    let selected = a.device.select()?;
    let shape = ual::bench::AttentionShape {
        batch: a.batch,
        heads: a.heads,
        kv_heads: a.kv_heads,
        head_dim: a.head_dim,
    };
    let report = ual::bench::attention(
        shape,
        &a.len,
        a.iters.max(1),
        &selected.device,
        &selected.description,
    )?;
    super::print_json(&report)
}

fn head(a: HeadArgs) -> Result<()> {
    let selected = a.device.select()?;
    let blocks = HeadPlan::new(true, a.vocab, usize::MAX, a.block_rows.unwrap_or(0))
        .split_vocab(a.vocab_splits, a.hidden, a.vocab, selected.hardware_gpu)
        .blocks;
    let report = ual::bench::head(
        a.rows,
        a.hidden,
        a.vocab,
        a.iters.max(1),
        blocks,
        &selected.device,
        &selected.description,
    )?;
    super::print_json(&report)
}
