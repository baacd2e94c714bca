//! `ual annotate`: add an `uncertainty` score to each JSONL line, from an LLM endpoint or a
//! local model.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use ual::annotate::{self, ApiOptions, PromptPreset};
use ual::data::template::{Template, TemplateKind};
use ual::model::Pretrained;

use super::DeviceArg;

/// `ual annotate`.
#[derive(clap::Args)]
pub struct Args {
    /// The JSONL file to score.
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
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// A prompt template with {instruction}, {input}, {response} and {example} (the turns
    /// joined with newlines); default: the preset's.
    #[arg(long)]
    prompt: Option<PathBuf>,
    /// The built-in elicitation: ual's 1–10 prompt, or the authors' 0–99 prompt, verbatim,
    /// with their sampling settings (temperature 0, top_p 0.9, max_tokens 4096).
    #[arg(long, value_enum, default_value = "ual")]
    prompt_preset: PromptPreset,
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
    #[arg(long, default_value_t = 60.0, value_parser = positive_seconds)]
    timeout: f64,
    /// The longest wait, in seconds, that a server's `Retry-After` (seconds or an HTTP date) is
    /// granted.
    #[arg(long, default_value_t = 300.0, value_parser = positive_seconds)]
    max_wait: f64,
    /// Ask again for the lines a previous run failed on (their cached replies held no score).
    #[arg(long)]
    retry_failed: bool,
    /// First backoff delay in milliseconds; it doubles per retry, with jitter.
    #[arg(long, default_value_t = 500, hide = true)]
    retry_base_ms: u64,
    /// Score with a local model's predictive entropy instead of an endpoint.
    #[arg(long)]
    from_model: Option<PathBuf>,
    /// A PEFT adapter for --from-model.
    #[arg(long, requires = "from_model")]
    adapter: Option<PathBuf>,
    /// How --from-model renders the lines: alpaca, chat_template, vicuna or vicuna_lima.
    #[arg(long, default_value = "alpaca", requires = "from_model")]
    template: TemplateKind,
    #[command(flatten)]
    device: DeviceArg,
}

/// Scores every line, then says how it went on stderr and as JSON on stdout.
pub fn main(args: Args) -> Result<()> {
    let summary = match &args.from_model {
        Some(dir) => {
            let selected = args.device.select()?;
            let model =
                Pretrained::load_with_adapter(dir, args.adapter.as_deref(), &selected.device)?;
            let template = Template::load(args.template, dir)?;
            annotate::local::run_local(&args.input, &args.output, &model, &template, args.limit)?
        }
        None => annotate::run_api(&api_options(&args))?,
    };
    eprint!("{}", annotate::describe(&summary));
    println!("{}", serde_json::to_string(&summary)?);
    if summary.lines > 0 && summary.scored == 0 {
        bail!(
            "no line of {} was scored ({} failed; reasons in {}.failed.jsonl)",
            args.input.display(),
            summary.failed,
            args.output.display()
        );
    }
    Ok(())
}

fn api_options(args: &Args) -> ApiOptions {
    ApiOptions {
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
        timeout: Duration::from_secs_f64(args.timeout),
        retry_base: Duration::from_millis(args.retry_base_ms),
        max_wait: Duration::from_secs_f64(args.max_wait),
        retry_failed: args.retry_failed,
    }
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

/// A finite number of seconds above 0 and at most a day.
fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!("{text:?} is not a number of seconds in (0, 86400]")),
    }
}
