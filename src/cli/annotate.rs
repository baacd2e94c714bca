//! `ual annotate`: add an `uncertainty` score to each JSONL line, from an LLM endpoint or a
//! local model.

use std::path::PathBuf;

use anyhow::{Result, bail};
use ual::annotate::{self, ApiOptions, PromptPreset};
use ual::data::template::TemplateKind;
use ual::model::Pretrained;

use super::{ConnectionArgs, DeviceArg, DtypeArgs};

/// `ual annotate`.
#[derive(clap::Args)]
pub struct Args {
    /// The JSONL file to score.
    #[arg(long)]
    input: PathBuf,
    /// Written whole at the end; OUT.cache.jsonl and OUT.failed.jsonl sit beside it.
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    connection: ConnectionArgs,
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
    /// Ask again for the lines a previous run failed on (their cached replies held no score).
    #[arg(long)]
    retry_failed: bool,
    /// Score with a local model's predictive entropy instead of an endpoint.
    #[arg(long, conflicts_with = "endpoint")]
    from_model: Option<PathBuf>,
    /// A PEFT adapter for --from-model.
    #[arg(long, requires = "from_model")]
    adapter: Option<PathBuf>,
    /// How --from-model renders the lines: auto (the adapter's recorded template, else the
    /// model's chat template, else alpaca), alpaca, chat_template, vicuna or vicuna_lima.
    #[arg(long, default_value = "auto", requires = "from_model")]
    template: TemplateKind,
    #[command(flatten)]
    dtypes: DtypeArgs,
    #[command(flatten)]
    device: DeviceArg,
}

/// Scores every line, then says how it went on stderr and as JSON on stdout.
pub fn main(args: Args) -> Result<()> {
    if same_file(&args.input, &args.output) {
        bail!(
            "--output {} is --input itself; annotation would overwrite its own input (choose another file)",
            args.output.display()
        );
    }
    let summary = match &args.from_model {
        Some(dir) => {
            let selected = args.device.select()?;
            let types = args.dtypes.resolve(&selected)?;
            let model = Pretrained::load_with_adapter_as(
                dir,
                args.adapter.as_deref(),
                &selected.device,
                types,
            )?;
            let template = super::template_for(args.template, dir, args.adapter.as_deref())?;
            annotate::local::run_local(&args.input, &args.output, &model, &template, args.limit)?
        }
        None => annotate::run_api(&api_options(&args)?)?,
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

fn api_options(args: &Args) -> Result<ApiOptions> {
    let connection = args
        .connection
        .connection("give --endpoint URL --model NAME, or --from-model DIR")?;
    Ok(ApiOptions {
        input: args.input.clone(),
        output: args.output.clone(),
        connection,
        prompt: args.prompt.clone(),
        preset: args.prompt_preset,
        scale: args.scale.unwrap_or(args.prompt_preset.scale()),
        max_tokens: args.max_tokens,
        limit: args.limit,
        retry_failed: args.retry_failed,
    })
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

/// Whether two paths name one file (the output may not exist yet).
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}
