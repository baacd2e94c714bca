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
        /// Where file mode writes its JSONL (default: stdout).
        #[arg(long, requires = "input")]
        output: Option<PathBuf>,
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
    /// Analyses from the paper.
    #[command(subcommand)]
    Analyze(AnalyzeCommand),
    /// Measure performance; prints JSON.
    #[command(subcommand)]
    Bench(BenchCommand),
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
    /// A prompt template with {instruction}, {input} and {response}; default: the paper's.
    #[arg(long)]
    prompt: Option<PathBuf>,
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
    /// Clustering of response-token features by target id, without and with the adapter.
    Features {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        data: PathBuf,
        /// Response tokens measured (the cost grows with its square).
        #[arg(long, default_value_t = 2000)]
        max_tokens: usize,
        /// Directory for features.json and features.svg.
        #[arg(long, default_value = "runs/features")]
        output: PathBuf,
    },
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Exact-match accuracy of greedy answers on GSM8K.
    Gsm8k {
        #[command(flatten)]
        model: ModelArgs,
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
            raw,
            decoding,
        } => {
            let (pretrained, template) = model.load()?;
            let config = decoding.config();
            match (prompt, input) {
                (Some(prompt), _) => generate_one(&pretrained, &template, &prompt, raw, &config),
                (None, Some(input)) => {
                    generate_file(&pretrained, &template, &input, output.as_deref(), &config)
                }
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
            data,
            train,
            limit,
            shots,
            max_new_tokens,
            output,
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
            data,
            max_tokens,
            output,
        }) => analyze_features(&model, &data, max_tokens, &output),
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

/// One JSON line per input line: the prompt as the model saw it and its continuation.
fn generate_file(
    pretrained: &Pretrained,
    template: &ual::data::template::Template,
    input: &std::path::Path,
    output: Option<&std::path::Path>,
    config: &ual::model::generate::GenerationConfig,
) -> Result<()> {
    use ual::data::formats::{Body, Message};
    let examples = ual::data::formats::read_jsonl(input)?;
    let eos = pretrained.config.eos_token_ids.clone();
    let progress = indicatif::ProgressBar::new(examples.len() as u64);
    let mut lines = String::new();
    for (index, example) in examples.iter().enumerate() {
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
    if let Some(path) = output {
        ual::util::write_atomic(path, lines.as_bytes())?;
        eprintln!("wrote {} generations to {}", examples.len(), path.display());
    }
    Ok(())
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
