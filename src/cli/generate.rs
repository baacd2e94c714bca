//! `ual generate`: continue one prompt, streaming, or answer a file of prompts.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;
use ual::data::formats::{Message, read_prompt_lines};
use ual::data::template::Template;
use ual::eval::answers::{self, Answer, LongPrompt, Provenance};
use ual::model::Pretrained;
use ual::model::generate::{GenerationConfig, generate};

use super::{DecodingArgs, ModelArgs};

/// How `generate --input` writes its answers.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// One JSON line per input line: `{index, instruction, prompt, generation, finish}` with
    /// the model, adapter, template and decoding settings (what `ual eval judge` reads).
    Jsonl,
    /// The JSON array of `{"instruction", "output", "generator"}` the `alpaca_eval` package reads.
    AlpacaEval,
}

/// `ual generate`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// A prompt, asked in the training template unless --raw.
    #[arg(long, required_unless_present = "input", conflicts_with = "input")]
    prompt: Option<String>,
    /// Prompts to answer: a JSONL file (or a JSON array, such as AlpacaEval's
    /// `alpaca_eval.json`) in any training schema with or without responses, or bare strings;
    /// each is asked as training renders it.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Where file mode writes its output, atomically (default: stdout).
    #[arg(long, requires = "input")]
    output: Option<PathBuf>,
    /// File mode: a prompt that alone fills the model's positions stops the run naming its
    /// line (error), is recorded with `"finish": "skipped"` (skip), or keeps its last tokens
    /// (truncate-left).
    #[arg(long, value_enum, default_value = "error", requires = "input")]
    on_long_prompt: LongPrompt,
    /// File mode's output format.
    #[arg(long, value_enum, default_value = "jsonl", requires = "input")]
    format: OutputFormat,
    /// File mode: prompts decoded together (greedy decoding gives the same text at any batch
    /// size; sampling decodes one at a time so that a seed does too).
    #[arg(long, default_value_t = ual::eval::answers::BATCH, requires = "input")]
    batch_size: usize,
    /// The `generator` name of `--format alpaca-eval` (default: the run's name for a run's
    /// adapter, else the adapter's or model's file name).
    #[arg(long, requires = "input")]
    generator: Option<String>,
    /// Use --prompt as it is, without the template.
    #[arg(long)]
    raw: bool,
    #[command(flatten)]
    decoding: DecodingArgs,
}

/// Streams one continuation, or writes one answer per input line.
pub fn main(args: Args) -> Result<()> {
    let (pretrained, template) = args.model.load()?;
    let config = args.decoding.config();
    match (&args.prompt, &args.input) {
        (Some(prompt), _) => stream_one(&pretrained, &template, prompt, args.raw, &config),
        (None, Some(input)) => answer_file(&args, &pretrained, &template, input, &config),
        (None, None) => unreachable!("clap requires --prompt or --input"),
    }
}

/// Streams one continuation of `prompt` to stdout.
fn stream_one(
    pretrained: &Pretrained,
    template: &Template,
    prompt: &str,
    raw: bool,
    config: &GenerationConfig,
) -> Result<()> {
    let (text, special) = if raw {
        (prompt.to_string(), true)
    } else {
        let messages = [Message::new("user", prompt)];
        (
            template.prompt(&messages)?,
            !template.prompt_has_special_tokens(),
        )
    };
    let ids = pretrained.tokenizer.encode_with(&text, special)?;
    let budget = ual::model::generate::new_token_budget(
        &pretrained.model,
        std::slice::from_ref(&ids),
        config.max_new_tokens,
    )?;
    if budget < config.max_new_tokens {
        eprintln!(
            "note: at most {budget} new tokens: the prompt's {} and the model's {} positions leave no more",
            ids.len(),
            pretrained.config.max_position_embeddings
        );
    }
    let eos = pretrained.config.eos_token_ids.clone();
    let mut stdout = std::io::stdout();
    let out = generate(
        &pretrained.model,
        &pretrained.tokenizer,
        &eos,
        &[ids],
        &[0],
        config,
        |_, piece| {
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        },
    )?;
    println!();
    eprintln!("({} tokens, {:?})", out[0].ids.len(), out[0].finish);
    Ok(())
}

/// Answers every line of `input`; JSON lines stream to stdout unless `--output` is given.
fn answer_file(
    args: &Args,
    pretrained: &Pretrained,
    template: &Template,
    input: &Path,
    config: &GenerationConfig,
) -> Result<()> {
    let lines = read_prompt_lines(input)?;
    let (examples, fields): (Vec<_>, Vec<_>) =
        lines.into_iter().map(|l| (l.example, l.fields)).unzip();
    let started = std::time::Instant::now();
    let provenance = Provenance {
        model: args.model.model.display().to_string(),
        adapter: args.model.adapter.as_ref().map(|a| a.display().to_string()),
        template: template.kind(),
        decoding: config.clone(),
    };
    let jsonl_line = |a: &Answer| answers::answer_line(a, &provenance);
    let progress = indicatif::ProgressBar::new(examples.len() as u64);
    let streaming = args.output.is_none() && args.format == OutputFormat::Jsonl;
    let long = args.on_long_prompt;
    let batch = args.batch_size;
    let answers = answers::answer_all(
        pretrained,
        template,
        &examples,
        config,
        long,
        batch,
        |answer| {
            if streaming {
                progress.suspend(|| println!("{}", jsonl_line(answer)));
            }
            progress.inc(1);
            Ok(())
        },
    )
    .map_err(|e| anyhow::anyhow!("{}: {e:#}", input.display()))?;
    progress.finish_and_clear();
    let tokens: usize = answers.iter().map(|a| a.tokens).sum();
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "{} answers, {tokens} tokens in {seconds:.1} s ({:.1} tokens/s, batches of {batch})",
        answers.len(),
        tokens as f64 / seconds.max(1e-9)
    );
    let text = match args.format {
        OutputFormat::Jsonl => answers.iter().map(|a| jsonl_line(a) + "\n").collect(),
        OutputFormat::AlpacaEval => {
            let generator = args
                .generator
                .clone()
                .unwrap_or_else(|| generator_name(&args.model));
            serde_json::to_string_pretty(&answers::alpaca_eval(&answers, &fields, &generator))?
                + "\n"
        }
    };
    match &args.output {
        Some(path) => {
            ual::util::write_atomic(path, text.as_bytes())?;
            eprintln!("wrote {} generations to {}", answers.len(), path.display());
        }
        None if !streaming => print!("{text}"),
        None => {}
    }
    Ok(())
}

/// The run's name for a run's `adapter/`, else the adapter's or model's file name.
fn generator_name(model: &ModelArgs) -> String {
    let dir = model.adapter.as_ref().unwrap_or(&model.model);
    let dir = dir.canonicalize().unwrap_or(dir.clone());
    let named = match dir.file_name() {
        Some(n) if n == "adapter" => dir.parent().unwrap_or(&dir),
        _ => &dir,
    };
    named
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "ual".into())
}
