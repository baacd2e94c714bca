//! The `ual` command line: parse arguments, call the library, report errors on one line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use ual::device::{self, DeviceSpec};
use ual::eval::score;
use ual::model::Pretrained;
use ual::train::objective::HeadPlan;

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
        /// The template for Alpaca and chat lines: alpaca, chat_template, vicuna or vicuna_lima.
        #[arg(long, default_value = "alpaca")]
        template: ual::data::template::TemplateKind,
        /// With --data: prepare and score the lines as this training configuration would
        /// (template, loss_on, smoothing mapping over the file, spread, reduction, max_seq_len).
        #[arg(long, requires = "data")]
        config: Option<PathBuf>,
        /// Override a key of --config, as `ual train --set` does.
        #[arg(long = "set", value_name = "KEY=VALUE", requires = "config")]
        overrides: Vec<String>,
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
    /// Continue prompts with a model, streaming the text as it is produced.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// A prompt, asked in the training template unless --raw.
        #[arg(long, required_unless_present = "input", conflicts_with = "input")]
        prompt: Option<String>,
        /// A JSONL file of Alpaca, chat or prompt/completion lines; writes one JSON line each.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Where file mode writes its output (default: stdout).
        #[arg(long, requires = "input")]
        output: Option<PathBuf>,
        /// File mode's output: one JSON line per input line, or the JSON array of
        /// `{"instruction", "output", "generator"}` that the `alpaca_eval` package reads.
        #[arg(long, value_enum, default_value = "jsonl", requires = "input")]
        format: OutputFormat,
        /// The `generator` name of `--format alpaca-eval` (default: the adapter's or model's
        /// directory name).
        #[arg(long, requires = "input")]
        generator: Option<String>,
        /// Use --prompt as it is, without the template.
        #[arg(long)]
        raw: bool,
        #[command(flatten)]
        decoding: DecodingArgs,
    },
    /// Add an `uncertainty` score to each JSONL line, from an LLM endpoint or a local model.
    Annotate(AnnotateArgs),
    /// Evaluate a model; writes JSON.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Analyses of what training changed in the model.
    #[command(subcommand)]
    Analyze(AnalyzeCommand),
    /// Measure performance; prints JSON.
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// How `generate --input` writes its answers.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OutputFormat {
    Jsonl,
    AlpacaEval,
}

#[derive(clap::Args)]
struct AnnotateArgs {
    #[arg(long)]
    input: PathBuf,
    /// Written whole at the end; OUT.cache.jsonl and OUT.failed.jsonl sit beside it.
    #[arg(long)]
    output: PathBuf,
    /// An OpenAI-compatible server; requests go to {URL}/v1/chat/completions.
    #[arg(
        long,
        required_unless_present = "from_model",
        conflicts_with = "from_model"
    )]
    endpoint: Option<String>,
    /// The model name the endpoint serves.
    #[arg(long, required_unless_present = "from_model")]
    model: Option<String>,
    /// The environment variable holding the API key (never a flag, so it stays out of shell history).
    #[arg(long, default_value = "OPENAI_API_KEY")]
    api_key_env: String,
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// A prompt template with {instruction}, {input}, {response} and {example} (the turns
    /// joined with newlines); default: the preset's.
    #[arg(long)]
    prompt: Option<PathBuf>,
    /// The built-in elicitation: ual's 1–10 prompt, or the authors' 0–99 prompt, verbatim,
    /// with their sampling settings (temperature 0, top_p 0.9, max_tokens 4096).
    #[arg(long, value_enum, default_value = "ual")]
    prompt_preset: ual::annotate::PromptPreset,
    /// The scale replies are read on, MIN,MAX; default: the preset's (1,10 or 0,99).
    #[arg(long, value_name = "MIN,MAX", value_parser = parse_scale)]
    scale: Option<[f64; 2]>,
    /// The longest reply asked for (max_tokens); default: the preset's.
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Only the first N lines.
    #[arg(long)]
    limit: Option<usize>,
    /// Retries per request on connection errors, timeouts, 429 and 5xx.
    #[arg(long, default_value_t = 6)]
    max_retries: u32,
    /// Seconds before a request is abandoned (and retried).
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// First backoff delay in milliseconds; it doubles per retry, with jitter.
    #[arg(long, default_value_t = 500, hide = true)]
    retry_base_ms: u64,
    /// Score with a local model's predictive entropy instead of an endpoint.
    #[arg(long)]
    from_model: Option<PathBuf>,
    /// A PEFT adapter for --from-model.
    #[arg(long, requires = "from_model")]
    adapter: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArg,
}

/// A model directory, an optional adapter, the prompt template and the device.
#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// A Hugging Face model directory.
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter directory to apply (unmerged).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// How prompts are written: alpaca (as `ual train` by default) or chat_template.
    #[arg(long, default_value = "alpaca")]
    template: ual::data::template::TemplateKind,
    #[command(flatten)]
    device: DeviceArg,
}

impl ModelArgs {
    fn load(&self) -> Result<(Pretrained, ual::data::template::Template)> {
        let selected = device::select(self.device.device)?;
        eprintln!("device: {}", selected.description);
        let pretrained =
            Pretrained::load_with_adapter(&self.model, self.adapter.as_deref(), &selected.device)?;
        let template = ual::data::template::Template::load(self.template, &self.model)?;
        Ok((pretrained, template))
    }
}

#[derive(clap::Args, Clone)]
struct DecodingArgs {
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 decodes greedily.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the text contains this; repeat for several.
    #[arg(long)]
    stop: Vec<String>,
    /// Recompute the whole prefix for every token (slow; for comparison).
    #[arg(long)]
    no_cache: bool,
}

impl DecodingArgs {
    fn config(&self) -> ual::model::generate::GenerationConfig {
        ual::model::generate::GenerationConfig {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            stop: self.stop.clone(),
            use_cache: !self.no_cache,
        }
    }
}

#[derive(Subcommand)]
enum AnalyzeCommand {
    /// How token features cluster by target id. `--protocol ual`: response tokens, silhouette
    /// and intra/inter distance over all classes, without and with the adapter. `--protocol
    /// paper`: the authors' analysis (every prompt position by next-token id, the 42 most
    /// frequent ids, PCA(2) + silhouette for each of the 861 pairs, and their mean).
    Features {
        /// A Hugging Face model directory.
        #[arg(long)]
        model: PathBuf,
        /// A PEFT adapter; with --protocol paper repeat it for one row each (base first).
        #[arg(long = "adapter")]
        adapters: Vec<PathBuf>,
        /// How prompts are written (default: alpaca for ual, vicuna for paper).
        #[arg(long)]
        template: Option<ual::data::template::TemplateKind>,
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
        device: DeviceArg,
    },
}

/// How a maths benchmark is run.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Protocol {
    /// ual's: greedy answers in the training template, exact match of the final number.
    Ual,
    /// The authors': their prompt, 0-shot, T 0.8, top-k 200, 256 tokens, substring match.
    Paper,
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Accuracy on GSM8K: ual's greedy exact match, or the authors' sampled substring match.
    Gsm8k {
        #[command(flatten)]
        model: ModelArgs,
        /// `ual` (greedy, exact match) or `paper` (the authors' `math_bench.py`).
        #[arg(long, value_enum, default_value = "ual")]
        protocol: Protocol,
        /// The sampling seed of `--protocol paper` (item i draws from seed + i).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// GSM8K-format JSONL ({"question", "answer"}).
        #[arg(long, default_value = "data/gsm8k/test.jsonl")]
        data: PathBuf,
        /// Where few-shot exemplars come from.
        #[arg(long, default_value = "data/gsm8k/train.jsonl")]
        train: PathBuf,
        #[arg(long)]
        limit: Option<usize>,
        /// Worked examples shown before each question.
        #[arg(long, default_value_t = 0)]
        shots: usize,
        #[arg(long, default_value_t = 256)]
        max_new_tokens: usize,
        /// Write the JSON report here too (atomically).
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// The authors' MetaMath protocol: gold = the response's last word, sampled answers,
    /// substring match (their test set is the last 1,030 items of MetaMathQA: --tail 1030).
    Metamath {
        #[command(flatten)]
        model: ModelArgs,
        /// MetaMathQA records ({"query", "response"}), JSONL or a JSON array.
        #[arg(long)]
        data: PathBuf,
        /// Only the last N records.
        #[arg(long)]
        tail: Option<usize>,
        #[arg(long)]
        limit: Option<usize>,
        /// Item i samples from seed + i.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Write the JSON report here too (atomically).
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Mean response NLL, perplexity and UAL loss, overall and by uncertainty bucket.
    Loss {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 2048)]
        max_seq_len: usize,
    },
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
    /// One LoRA training step of a named model size on random weights; prints JSON with
    /// tokens/s, peak device memory and peak RSS (compare with scripts/bench_torch.py).
    Step {
        #[arg(long, value_enum, default_value = "small")]
        preset: ual::bench::step::Preset,
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
        gradient_checkpointing: ual::train::Checkpointing,
        /// Store frozen projection weights as f32, or f16 (adapters with SHADER_F16).
        #[arg(long, default_value = "f32")]
        base_dtype: String,
        #[arg(long, default_value_t = 16)]
        lora_r: usize,
        /// Untimed steps first (kernel compilation, autotune).
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[arg(long)]
        batch_size: Option<usize>,
        #[arg(long)]
        seq_len: Option<usize>,
        #[command(flatten)]
        device: DeviceArg,
    },
    /// The fused linear cross-entropy against logits-then-loss, forward + backward, in one run.
    Head {
        #[arg(long, default_value_t = 4096)]
        rows: usize,
        #[arg(long, default_value_t = 512)]
        hidden: usize,
        #[arg(long, default_value_t = 32_000)]
        vocab: usize,
        #[arg(long, default_value_t = 2)]
        iters: usize,
        /// Rows per block of the fused head; default: about 8 Mi logits, in whole 128-row tiles.
        #[arg(long)]
        chunk_rows: Option<usize>,
        /// Vocabulary slices of the hidden gradient (0: split on hardware GPUs only, 1: none).
        #[arg(long, default_value_t = 0)]
        vocab_splits: usize,
        #[command(flatten)]
        device: DeviceArg,
    },
    /// Decoding speed with and without the KV cache, in one run.
    Decode {
        #[arg(long, default_value = "models/tiny")]
        model: PathBuf,
        #[arg(
            long,
            default_value = "Natalia sold clips to 48 of her friends in April"
        )]
        prompt: String,
        #[arg(long, default_value_t = 64)]
        tokens: usize,
        #[command(flatten)]
        device: DeviceArg,
    },
}

/// Exact heap figures for `ual bench` on the CPU; the counting costs two relaxed atomics.
#[global_allocator]
static ALLOCATOR: ual::alloc::CountingAlloc = ual::alloc::CountingAlloc;

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
        Command::Generate {
            model,
            prompt,
            input,
            output,
            format,
            generator,
            raw,
            decoding,
        } => {
            let (pretrained, template) = model.load()?;
            let config = decoding.config();
            let generator = generator.unwrap_or_else(|| {
                let dir = model.adapter.as_ref().unwrap_or(&model.model);
                let dir = dir.canonicalize().unwrap_or(dir.clone());
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "ual".into())
            });
            let alpaca_eval = (format == OutputFormat::AlpacaEval).then_some(generator.as_str());
            match (prompt, input) {
                (Some(prompt), _) => generate_one(&pretrained, &template, &prompt, raw, &config),
                (None, Some(input)) => generate_file(
                    &pretrained,
                    &template,
                    &input,
                    output.as_deref(),
                    &config,
                    alpaca_eval,
                ),
                (None, None) => unreachable!("clap requires --prompt or --input"),
            }
        }
        Command::Annotate(args) => {
            let summary = match &args.from_model {
                Some(dir) => {
                    let selected = device::select(args.device.device)?;
                    eprintln!("device: {}", selected.description);
                    let model = Pretrained::load_with_adapter(
                        dir,
                        args.adapter.as_deref(),
                        &selected.device,
                    )?;
                    ual::annotate::local::run_local(&args.input, &args.output, &model, args.limit)?
                }
                None => ual::annotate::run_api(&ual::annotate::ApiOptions {
                    input: args.input.clone(),
                    output: args.output.clone(),
                    endpoint: args.endpoint.clone().expect("clap requires --endpoint"),
                    model: args.model.clone().expect("clap requires --model"),
                    api_key_env: args.api_key_env.clone(),
                    concurrency: args.concurrency,
                    prompt: args.prompt.clone(),
                    preset: args.prompt_preset,
                    scale: args.scale.unwrap_or(args.prompt_preset.scale()),
                    max_tokens: args.max_tokens,
                    limit: args.limit,
                    max_retries: args.max_retries,
                    timeout: std::time::Duration::from_secs_f64(args.timeout),
                    retry_base: std::time::Duration::from_millis(args.retry_base_ms),
                })?,
            };
            eprint!("{}", ual::annotate::describe(&summary));
            println!("{}", serde_json::to_string(&summary)?);
            Ok(())
        }
        Command::Eval(EvalCommand::Gsm8k {
            model,
            protocol: Protocol::Paper,
            seed,
            data,
            limit,
            shots,
            output,
            ..
        }) => {
            if shots > 0 {
                anyhow::bail!("--protocol paper is the authors' 0-shot run; drop --shots");
            }
            let (pretrained, _) = model.load()?;
            let mut items = ual::eval::paper::read_gsm8k(&data)?;
            items.truncate(limit.unwrap_or(usize::MAX));
            let report =
                ual::eval::paper::evaluate(&pretrained, &items, seed, &data.display().to_string())?;
            write_report(&report, output.as_deref(), report.correct, report.total)
        }
        Command::Eval(EvalCommand::Metamath {
            model,
            data,
            tail,
            limit,
            seed,
            output,
        }) => {
            let (pretrained, _) = model.load()?;
            let mut items = ual::eval::paper::read_metamath(&data)?;
            if let Some(n) = tail {
                items.drain(..items.len().saturating_sub(n));
            }
            items.truncate(limit.unwrap_or(usize::MAX));
            let report =
                ual::eval::paper::evaluate(&pretrained, &items, seed, &data.display().to_string())?;
            write_report(&report, output.as_deref(), report.correct, report.total)
        }
        Command::Eval(EvalCommand::Gsm8k {
            model,
            data,
            train,
            limit,
            shots,
            max_new_tokens,
            output,
            ..
        }) => {
            let (pretrained, template) = model.load()?;
            let mut items = ual::eval::gsm8k::read_items(&data)?;
            items.truncate(limit.unwrap_or(usize::MAX));
            let mut exemplars = if shots > 0 {
                ual::eval::gsm8k::read_items(&train)?
            } else {
                Vec::new()
            };
            exemplars.truncate(shots);
            let name = data.display().to_string();
            let report = ual::eval::gsm8k::evaluate(
                &pretrained,
                &template,
                &items,
                &exemplars,
                max_new_tokens,
                &name,
            )?;
            let json = serde_json::to_string_pretty(&report)?;
            if let Some(path) = output {
                ual::util::write_atomic(&path, json.as_bytes())?;
            }
            println!("{json}");
            eprintln!(
                "accuracy {:.2}% ({}/{})",
                100.0 * report.accuracy,
                report.correct,
                report.total
            );
            Ok(())
        }
        Command::Eval(EvalCommand::Loss {
            model,
            data,
            max_seq_len,
        }) => {
            use anyhow::Context;
            let (pretrained, template) = model.load()?;
            let examples = ual::data::formats::read_jsonl(&data)?;
            let eos = pretrained.config.eos_token_id()?;
            let smoothing = ual::uncertainty::SmoothingConfig::default();
            let (samples, _) = ual::data::batch::tokenize(
                &examples,
                &pretrained.tokenizer,
                &template,
                eos,
                &smoothing,
                max_seq_len,
                ual::data::batch::Overflow::Truncate,
            )
            .with_context(|| data.display().to_string())?;
            let progress = indicatif::ProgressBar::new(samples.len() as u64);
            let report = ual::eval::heldout::evaluate_loss(
                &pretrained.model,
                &samples,
                &data.display().to_string(),
                || progress.inc(1),
            )?;
            progress.finish_and_clear();
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Analyze(AnalyzeCommand::Features {
            model,
            adapters,
            template,
            protocol: Protocol::Paper,
            data,
            max_seq_len,
            raw,
            json,
            plot,
            output,
            device,
            ..
        }) => {
            use anyhow::Context;
            let selected = device::select(device.device)?;
            eprintln!("device: {}", selected.description);
            let kind = template.unwrap_or(ual::data::template::TemplateKind::Vicuna);
            let template = ual::data::template::Template::load(kind, &model)?;
            let prompts = ual::data::formats::read_prompts(&data)?;
            std::fs::create_dir_all(&output)
                .with_context(|| format!("cannot create {}", output.display()))?;
            let request = ual::eval::clustering::Request {
                model_dir: &model,
                adapters: std::iter::once(None)
                    .chain(adapters.iter().map(|a| Some(a.as_path())))
                    .collect(),
                template: &template,
                raw,
                prompts: &prompts,
                max_seq_len,
                plot: plot.map(|p| (p, output.as_path())),
            };
            let results = ual::eval::clustering::analyse_models(&request, &selected.device)?;
            let report = serde_json::to_string_pretty(&results)?;
            ual::util::write_atomic(&output.join("clustering.json"), report.as_bytes())?;
            for r in &results {
                if json {
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
        Command::Analyze(AnalyzeCommand::Features {
            model,
            adapters,
            template,
            data,
            max_tokens,
            output,
            device,
            ..
        }) => {
            if adapters.len() > 1 {
                anyhow::bail!(
                    "--protocol ual compares the base with one adapter; give one --adapter"
                );
            }
            let args = ModelArgs {
                model,
                adapter: adapters.into_iter().next(),
                template: template.unwrap_or_default(),
                device,
            };
            analyze_features(&args, &data, max_tokens, &output)
        }
        Command::Bench(BenchCommand::Decode {
            model,
            prompt,
            tokens,
            device,
        }) => {
            let selected = device::select(device.device)?;
            eprintln!("device: {}", selected.description);
            let pretrained = Pretrained::load(&model, &selected.device)?;
            let report = ual::bench::decode(&pretrained, &prompt, tokens, &selected.description)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
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
        Command::Bench(BenchCommand::Step {
            preset,
            unfused_head,
            head_block_rows,
            head_vocab_splits,
            gradient_checkpointing,
            base_dtype,
            lora_r,
            warmup,
            steps,
            batch_size,
            seq_len,
            device,
        }) => {
            let selected = device::select(device.device)?;
            eprintln!("device: {}", selected.description);
            let base =
                ual::model::lora::frozen_dtype(&base_dtype, selected.shader_f16, selected.is_wgpu)?;
            let options = ual::bench::step::StepOptions {
                fused_head: !unfused_head,
                head_block_rows,
                head_vocab_splits,
                gradient_checkpointing,
                base_dtype,
                lora_r,
                warmup_steps: warmup,
                steps: steps.max(1),
                batch_size,
                seq_len,
            };
            let report = ual::bench::step::run(preset, options, &selected, base)?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::Bench(BenchCommand::Head {
            rows,
            hidden,
            vocab,
            iters,
            chunk_rows,
            vocab_splits,
            device,
        }) => {
            let selected = device::select(device.device)?;
            eprintln!("device: {}", selected.description);
            let blocks = HeadPlan::new(true, vocab, usize::MAX, chunk_rows.unwrap_or(0))
                .split_vocab(vocab_splits, hidden, vocab, selected.hardware_gpu)
                .blocks();
            let report = ual::bench::head(
                rows,
                hidden,
                vocab,
                iters.max(1),
                blocks,
                &selected.device,
                &selected.description,
            )?;
            println!("{}", serde_json::to_string_pretty(&report)?);
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
            config,
            overrides,
            json,
            device,
        } => {
            let selected = device::select(device.device)?;
            eprintln!("device: {}", selected.description);
            let pretrained =
                Pretrained::load_with_adapter(&model, adapter.as_deref(), &selected.device)?;
            if let (Some(data), Some(file)) = (&data, &config) {
                let config = ual::train::TrainConfig::resolve(Some(file), &overrides)?;
                return score::score_file(&pretrained, &config, data, |line| {
                    println!("{}", serde_json::to_string(&line)?);
                    Ok(())
                });
            }
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

/// Cluster quality of the base model, then of base + adapter when one is given.
fn analyze_features(
    args: &ModelArgs,
    data: &std::path::Path,
    max_tokens: usize,
    output: &std::path::Path,
) -> Result<()> {
    use anyhow::Context;
    use ual::eval::features::{cluster_quality, plot, response_features};
    let base_args = ModelArgs {
        adapter: None,
        ..args.clone()
    };
    let mut variants = vec![(base_args, "base".to_string())];
    if let Some(adapter) = &args.adapter {
        variants.push((args.clone(), format!("base + {}", adapter.display())));
    }
    let mut results = Vec::new();
    for (variant, label) in variants {
        let (pretrained, template) = variant.load()?;
        let eos = pretrained.config.eos_token_id()?;
        let examples = ual::data::formats::read_jsonl(data)?;
        let smoothing = ual::uncertainty::SmoothingConfig::default();
        let overflow = ual::data::batch::Overflow::Truncate;
        let (samples, _) = ual::data::batch::tokenize(
            &examples,
            &pretrained.tokenizer,
            &template,
            eos,
            &smoothing,
            2048,
            overflow,
        )
        .with_context(|| data.display().to_string())?;
        let (points, labels) = response_features(&pretrained.model, &samples, max_tokens)?;
        let quality = cluster_quality(&label, &points, &labels)?;
        eprintln!(
            "{label}: silhouette {:.4}, intra/inter {:.4}",
            quality.silhouette, quality.intra_inter_ratio
        );
        results.push(quality);
    }
    std::fs::create_dir_all(output)
        .with_context(|| format!("cannot create {}", output.display()))?;
    let json = serde_json::to_string_pretty(&serde_json::json!({
        "metric": "silhouette (Euclidean) and mean intra/inter-class distance of last hidden states, by target id",
        "data": data.display().to_string(),
        "results": results,
    }))?;
    ual::util::write_atomic(&output.join("features.json"), json.as_bytes())?;
    plot(&results, &output.join("features.svg"))?;
    println!("{json}");
    Ok(())
}

/// Streams one continuation of `prompt` to stdout.
fn generate_one(
    pretrained: &Pretrained,
    template: &ual::data::template::Template,
    prompt: &str,
    raw: bool,
    config: &ual::model::generate::GenerationConfig,
) -> Result<()> {
    use std::io::Write;
    let (text, special) = if raw {
        (prompt.to_string(), true)
    } else {
        let messages = [ual::data::formats::Message::new("user", prompt)];
        (
            template.prompt(&messages)?,
            !template.prompt_has_special_tokens(),
        )
    };
    let ids = pretrained.tokenizer.encode_with(&text, special)?;
    let eos = pretrained.config.eos_token_ids.clone();
    let mut stdout = std::io::stdout();
    let out = ual::model::generate::generate(
        &pretrained.model,
        &pretrained.tokenizer,
        &eos,
        &[ids],
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

/// One JSON line per input line: the prompt as the model saw it and its continuation; or, with
/// `alpaca_eval = Some(generator)`, AlpacaEval's JSON array of model outputs.
fn generate_file(
    pretrained: &Pretrained,
    template: &ual::data::template::Template,
    input: &std::path::Path,
    output: Option<&std::path::Path>,
    config: &ual::model::generate::GenerationConfig,
    alpaca_eval: Option<&str>,
) -> Result<()> {
    use ual::data::formats::{Body, Message};
    let examples = ual::data::formats::read_jsonl(input)?;
    let eos = pretrained.config.eos_token_ids.clone();
    let progress = indicatif::ProgressBar::new(examples.len() as u64);
    let mut lines = String::new();
    let mut outputs = Vec::new();
    for (index, example) in examples.iter().enumerate() {
        let instruction = match &example.body {
            Body::Completion { prompt, .. } => prompt.clone(),
            Body::Alpaca {
                instruction, input, ..
            } => ual::data::formats::user_text(instruction, input),
            Body::Chat { messages } => messages
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .map(|m| m.content.clone())
                .unwrap_or_default(),
        };
        let (prompt, special) = match &example.body {
            Body::Completion { prompt, .. } => (prompt.clone(), true),
            Body::Alpaca {
                instruction, input, ..
            } => {
                let user = if input.trim().is_empty() {
                    instruction.clone()
                } else {
                    format!("{instruction}\n\n{input}")
                };
                (
                    template.prompt(&[Message::new("user", &user)])?,
                    !template.prompt_has_special_tokens(),
                )
            }
            Body::Chat { messages } => {
                // Everything before the last assistant turn is the conversation so far.
                let last = messages
                    .iter()
                    .rposition(|m| m.role == "assistant")
                    .unwrap_or(messages.len());
                (
                    template.prompt(&messages[..last])?,
                    !template.prompt_has_special_tokens(),
                )
            }
        };
        let ids = pretrained.tokenizer.encode_with(&prompt, special)?;
        let generation = ual::model::generate::generate(
            &pretrained.model,
            &pretrained.tokenizer,
            &eos,
            &[ids],
            config,
            |_, _| {},
        )?
        .remove(0);
        if let Some(generator) = alpaca_eval {
            outputs.push(serde_json::json!({
                "instruction": instruction, "output": generation.text.trim(), "generator": generator,
            }));
            progress.inc(1);
            continue;
        }
        let line = serde_json::json!({
            "index": index, "prompt": prompt, "generation": generation.text, "finish": generation.finish,
        });
        match output {
            Some(_) => lines.push_str(&format!("{line}\n")),
            None => progress.suspend(|| println!("{line}")),
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    if alpaca_eval.is_some() {
        lines = serde_json::to_string_pretty(&outputs)? + "\n";
        if output.is_none() {
            print!("{lines}");
        }
    }
    if let Some(path) = output {
        ual::util::write_atomic(path, lines.as_bytes())?;
        eprintln!("wrote {} generations to {}", examples.len(), path.display());
    }
    Ok(())
}

/// One JSON line per data line, with the trainer's tokenisation and ual's default ε mapping.
fn score_data(
    pretrained: &Pretrained,
    template: &ual::data::template::Template,
    data: &std::path::Path,
    max_seq_len: usize,
) -> Result<()> {
    use anyhow::Context;
    use ual::data::batch::{Overflow, tokenize};
    let examples = ual::data::formats::read_jsonl(data)?;
    let eos = pretrained.config.eos_token_id()?;
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

/// Prints a JSON report (and writes it to `output` atomically) and its accuracy.
fn write_report(
    report: &impl serde::Serialize,
    output: Option<&std::path::Path>,
    correct: usize,
    total: usize,
) -> Result<()> {
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

/// `MIN,MAX` with MIN < MAX.
fn parse_scale(text: &str) -> Result<[f64; 2], String> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    let [min, max] = parts[..] else {
        return Err(format!("{text:?}: expected MIN,MAX"));
    };
    let number = |s: &str| {
        s.parse::<f64>()
            .map_err(|_| format!("{s:?} is not a number"))
    };
    let (min, max) = (number(min)?, number(max)?);
    if !(min.is_finite() && max.is_finite() && min < max) {
        return Err(format!("{text:?}: expected MIN < MAX"));
    }
    Ok([min, max])
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
