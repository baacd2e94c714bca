//! `ual eval`: maths accuracy (ual's protocol or the authors'), held-out loss, and a judged
//! comparison of two answer sets.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use ual::data::batch::Prepare;
use ual::eval::{gsm8k, heldout, paper};

use super::{ConnectionArgs, ModelArgs};

/// How a maths benchmark is run.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// ual's: greedy answers in the training template, exact match of the final number.
    Ual,
    /// The authors': their prompt, 0-shot, T 0.8, top-k 200, 256 tokens, substring match.
    Paper,
}

/// `ual eval`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Accuracy on GSM8K: ual's greedy exact match, or the authors' sampled substring match.
    Gsm8k(Gsm8kArgs),
    /// The authors' MetaMath protocol: gold = the response's last word, sampled answers,
    /// substring match (their test set is the last 1,030 items of MetaMathQA: --tail 1030).
    Metamath(MetamathArgs),
    /// Mean response NLL, perplexity and UAL loss, overall and by uncertainty bucket.
    Loss(LossArgs),
    /// Which of two answer sets an OpenAI-compatible judge prefers: each prompt judged in both
    /// orders (a preference must survive the swap), win/tie/loss rates with 95% bootstrap
    /// intervals, resumable through its cache.
    Judge(JudgeArgs),
}

/// What every maths evaluation takes besides its data.
#[derive(clap::Args)]
pub struct RunArgs {
    /// Only the first N items.
    #[arg(long)]
    limit: Option<usize>,
    /// The sampling seed of the authors' protocol (item i draws from seed + i).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the JSON report here too (atomically).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Prompts decoded together: the answers are the same at any batch size (each item
    /// samples from its own stream), larger batches are faster and hold more KV cache.
    #[arg(long, default_value_t = ual::eval::answers::BATCH)]
    batch_size: usize,
}

/// `ual eval gsm8k`.
#[derive(clap::Args)]
pub struct Gsm8kArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// `ual` (greedy, exact match) or `paper` (the authors' `math_bench.py`).
    #[arg(long, value_enum, default_value = "ual")]
    protocol: Protocol,
    /// GSM8K-format JSONL ({"question", "answer"}).
    #[arg(long, default_value = "data/gsm8k/test.jsonl")]
    data: PathBuf,
    /// Where few-shot exemplars come from.
    #[arg(long, default_value = "data/gsm8k/train.jsonl")]
    train: PathBuf,
    /// Worked examples shown before each question.
    #[arg(long, default_value_t = 0)]
    shots: usize,
    /// The longest answer generated.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    #[command(flatten)]
    run: RunArgs,
}

/// `ual eval metamath`.
#[derive(clap::Args)]
pub struct MetamathArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// MetaMathQA records ({"query", "response"}), JSONL or a JSON array.
    #[arg(long)]
    data: PathBuf,
    /// Only the last N records (then `--limit` takes the first of those).
    #[arg(long)]
    tail: Option<usize>,
    #[command(flatten)]
    run: RunArgs,
}

/// `ual eval loss`.
#[derive(clap::Args)]
pub struct LossArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A training-schema JSONL file.
    #[arg(long)]
    data: PathBuf,
    /// Samples longer than this are truncated at the response end.
    #[arg(long, default_value_t = 2048)]
    max_seq_len: usize,
}

/// `ual eval judge`.
#[derive(clap::Args)]
pub struct JudgeArgs {
    /// The answers under test: `ual generate --input --output` lines.
    #[arg(long)]
    a: PathBuf,
    /// What they are compared with: another model's answers, or a training-schema file whose
    /// responses are the references.
    #[arg(long)]
    b: PathBuf,
    /// Directory of summary.json, judgments.jsonl, winrate.svg and judge.cache.jsonl.
    #[arg(long, default_value = "runs/judge")]
    output: PathBuf,
    #[command(flatten)]
    connection: ConnectionArgs,
    /// A judge prompt with {question}, {primary} and {secondary}, whose reply ends in 1 (the
    /// first answer is better), 2 (neither) or 3 (the first is worse); default: the authors'
    /// LIMA comparison prompt.
    #[arg(long)]
    prompt: Option<PathBuf>,
    /// The longest reply asked for (default: the authors' 4096).
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Only the first N prompts.
    #[arg(long)]
    limit: Option<usize>,
    /// Bootstrap draws for the 95% intervals.
    #[arg(long, default_value_t = 2000)]
    resamples: usize,
    /// The bootstrap's seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Ask again for the orders whose cached reply held no verdict.
    #[arg(long)]
    retry_failed: bool,
}

/// Runs one evaluation and prints its JSON report.
pub fn main(command: Command) -> Result<()> {
    match command {
        Command::Gsm8k(args) if args.protocol == Protocol::Paper => gsm8k_paper(args),
        Command::Gsm8k(args) => gsm8k_ual(args),
        Command::Metamath(args) => metamath(args),
        Command::Loss(args) => loss(args),
        Command::Judge(args) => judge(args),
    }
}

fn gsm8k_ual(args: Gsm8kArgs) -> Result<()> {
    let (pretrained, template) = args.model.load()?;
    let mut items = gsm8k::read_items(&args.data)?;
    items.truncate(args.run.limit.unwrap_or(usize::MAX));
    let mut exemplars = match args.shots {
        0 => Vec::new(),
        _ => gsm8k::read_items(&args.train)?,
    };
    exemplars.truncate(args.shots);
    let name = args.data.display().to_string();
    let report = gsm8k::evaluate(
        &pretrained,
        &template,
        &items,
        &exemplars,
        args.max_new_tokens,
        args.run.batch_size,
        &name,
    )?;
    write_report(
        &report,
        args.run.output.as_deref(),
        report.graded.correct,
        report.graded.total,
    )
}

fn gsm8k_paper(args: Gsm8kArgs) -> Result<()> {
    if args.shots > 0 {
        bail!("--protocol paper is the authors' 0-shot run; drop --shots");
    }
    let items = paper::read_gsm8k(&args.data)?;
    paper_report(&args.model, &args.run, &args.data, items)
}

fn metamath(args: MetamathArgs) -> Result<()> {
    let mut items = paper::read_metamath(&args.data)?;
    if let Some(n) = args.tail {
        items.drain(..items.len().saturating_sub(n));
    }
    paper_report(&args.model, &args.run, &args.data, items)
}

/// The authors' protocol on the first `--limit` of `items`, reported.
fn paper_report(
    model: &ModelArgs,
    run: &RunArgs,
    data: &Path,
    mut items: Vec<paper::MathItem>,
) -> Result<()> {
    items.truncate(run.limit.unwrap_or(usize::MAX));
    let (pretrained, _) = model.load()?;
    let data = data.display().to_string();
    let report = paper::evaluate(&pretrained, &items, run.seed, run.batch_size, &data)?;
    write_report(
        &report,
        run.output.as_deref(),
        report.graded.correct,
        report.graded.total,
    )
}

fn loss(args: LossArgs) -> Result<()> {
    let (pretrained, template) = args.model.load()?;
    let eos = pretrained.config.eos_token_id()?;
    let prepare = Prepare::new(&pretrained.tokenizer, &template, eos, args.max_seq_len);
    let (_, samples, _) = prepare.file(&args.data)?;
    let cluster = ual::cluster::world();
    let mine = ual::cluster::shard::slice(samples.len(), cluster.rank(), cluster.size());
    let progress = match cluster.is_root() {
        true => indicatif::ProgressBar::new(mine.len() as u64),
        false => indicatif::ProgressBar::hidden(),
    };
    let name = args.data.display().to_string();
    let report = heldout::evaluate_loss(&pretrained.model, &samples, &name, || progress.inc(1))?;
    progress.finish_and_clear();
    super::print_json(&report)
}

fn judge(args: JudgeArgs) -> Result<()> {
    let options = ual::judge::JudgeOptions {
        connection: args
            .connection
            .connection("eval judge needs a judge: --endpoint URL --model NAME")?,
        a: args.a,
        b: args.b,
        output: args.output,
        prompt: args.prompt,
        max_tokens: args.max_tokens,
        limit: args.limit,
        resamples: args.resamples,
        seed: args.seed,
        retry_failed: args.retry_failed,
    };
    let summary = ual::judge::run(&options)?;
    eprint!("{}", ual::judge::describe(&summary));
    eprintln!("wrote {}", options.output.display());
    println!("{}", serde_json::to_string(&summary)?);
    if summary.prompts > 0 && summary.judged == 0 {
        let cause = match summary.failure_reasons.first() {
            Some((reason, n)) => format!("; most often ({n}×): {reason}"),
            None => String::new(),
        };
        bail!(
            "no prompt was judged ({} failed{cause}; every reply and reason is in {})",
            summary.failed,
            options.output.join("judgments.jsonl").display()
        );
    }
    Ok(())
}

/// Prints a JSON report (and writes it to `output` atomically) and its accuracy.
fn write_report(
    report: &impl serde::Serialize,
    output: Option<&Path>,
    correct: usize,
    total: usize,
) -> Result<()> {
    if !ual::cluster::world().is_root() {
        return Ok(());
    }
    let json = serde_json::to_string_pretty(report)?;
    if let Some(path) = output {
        ual::util::write_atomic(path, json.as_bytes())?;
    }
    println!("{json}");
    eprintln!(
        "accuracy {:.2}% ({correct}/{total})",
        100.0 * correct as f64 / total.max(1) as f64
    );
    Ok(())
}
