//! The `ual` subcommands, one module each: parse the arguments, call the library, print.
//!
//! This module holds what several commands share: the device, model and decoding arguments.

pub mod analyze;
pub mod annotate;
pub mod bench;
pub mod devices;
pub mod eval;
pub mod export;
pub mod generate;
pub mod merge;
pub mod score;
pub mod study;
pub mod train;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use ual::data::template::{Template, TemplateKind};
use ual::device::{self, DeviceSpec, Selected};
use ual::llm::Connection;
use ual::model::Pretrained;
use ual::model::generate::GenerationConfig;
use ual::model::precision::{BaseDtype, Dtypes, Precision, Resolved};

/// `text` as a TOML string, so that any path or name survives `--set`'s parsing.
pub fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

/// `path` as a TOML string ([`toml_string`]).
pub fn toml_path(path: &std::path::Path) -> String {
    toml_string(&path.display().to_string())
}

/// `--device`.
#[derive(clap::Args, Clone, Copy)]
pub struct DeviceArg {
    /// Where to compute: auto (first hardware wgpu adapter, else CPU), cpu, wgpu or wgpu:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
}

impl DeviceArg {
    /// The device asked for, said on stderr.
    pub fn select(self) -> Result<Selected> {
        let cluster = ual::cluster::world();
        let selected = device::select_for_rank(self.device, cluster.local_rank())?;
        eprintln!(
            "{}",
            cluster.label(&format!("device: {}", selected.description))
        );
        Ok(selected)
    }
}

/// `--base-dtype` and `--precision`: how a loaded model is held and computes.
#[derive(clap::Args, Clone, Copy)]
pub struct DtypeArgs {
    /// Store the frozen projections as f32 (the compute type), f16, or quantized at load into
    /// llama.cpp's q8_0 or q4_0 blocks.
    #[arg(long, default_value = "f32")]
    pub base_dtype: BaseDtype,
    /// What the decoder computes in: f32, f16 (SHADER_F16 on wgpu) or bf16 (CPU, Metal).
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
}

impl DtypeArgs {
    /// The types on the chosen device.
    pub fn resolve(self, selected: &Selected) -> Result<Resolved> {
        let types = Dtypes {
            base: self.base_dtype,
            precision: self.precision,
        };
        types.resolve(selected.types())
    }
}

/// A model directory, an optional adapter, the prompt template and the device.
#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// A Hugging Face model directory or a GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter directory to apply (unmerged).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// How prompts are written: auto (the adapter's recorded template, else the model's chat
    /// template, else alpaca), alpaca, chat_template, vicuna or vicuna_lima.
    #[arg(long, default_value = "auto")]
    pub template: TemplateKind,
    #[command(flatten)]
    pub dtypes: DtypeArgs,
    #[command(flatten)]
    pub device: DeviceArg,
}

impl ModelArgs {
    /// The model with its adapter on the chosen device, and its template.
    pub fn load(&self) -> Result<(Pretrained, Template)> {
        let selected = self.device.select()?;
        let pretrained = Pretrained::load_with_adapter_as(
            &self.model,
            self.adapter.as_deref(),
            &selected.device,
            self.dtypes.resolve(&selected)?,
        )?;
        let template = Template::load(self.template_kind()?, &self.model)?;
        Ok((pretrained, template))
    }

    /// The template the prompts are written in, resolved ([`template_kind`]).
    pub fn template_kind(&self) -> Result<TemplateKind> {
        template_kind(self.template, &self.model, self.adapter.as_deref())
    }
}

/// The template a command prompts with, loaded ([`template_kind`]).
pub fn template_for(
    asked: TemplateKind,
    model: &std::path::Path,
    adapter: Option<&std::path::Path>,
) -> Result<Template> {
    Template::load(template_kind(asked, model, adapter)?, model)
}

/// The template a command prompts with: an explicit `--template` (warning once when the
/// adapter recorded another), else the adapter's recorded one, else the model's own chat
/// template, else Alpaca. Never `auto`.
pub fn template_kind(
    asked: TemplateKind,
    model: &std::path::Path,
    adapter: Option<&std::path::Path>,
) -> Result<TemplateKind> {
    let recorded = match adapter {
        Some(dir) => ual::model::peft::recorded_template(dir)?,
        None => None,
    };
    let kind = match (asked, recorded) {
        (TemplateKind::Auto, Some(recorded)) => recorded,
        (asked, Some(recorded)) if asked != recorded => {
            eprintln!(
                "warning: --template {} differs from the {} the adapter was trained with",
                asked.name(),
                recorded.name()
            );
            asked
        }
        (asked, _) => asked,
    };
    Ok(kind.resolve(model))
}

/// An OpenAI-compatible endpoint and the client's settings (`annotate`, `eval judge`).
#[derive(clap::Args, Clone)]
pub struct ConnectionArgs {
    /// An OpenAI-compatible server; requests go to {URL}/v1/chat/completions.
    #[arg(long, requires = "model")]
    pub endpoint: Option<String>,
    /// The model name the endpoint serves.
    #[arg(long, requires = "endpoint")]
    pub model: Option<String>,
    /// The environment variable holding the API key (never a flag, so it stays out of shell history).
    #[arg(long, default_value = "OPENAI_API_KEY")]
    pub api_key_env: String,
    /// Requests in flight at once (at least 1).
    #[arg(long, default_value_t = 4, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub concurrency: usize,
    /// Retries per request on connection errors, timeouts, 429 and 5xx.
    #[arg(long, default_value_t = 6)]
    pub max_retries: u32,
    /// Seconds before a request is abandoned (and retried).
    #[arg(long, default_value_t = 60.0, value_parser = positive_seconds)]
    pub timeout: f64,
    /// The longest wait, in seconds, that a server's `Retry-After` (seconds or an HTTP date) is
    /// granted.
    #[arg(long, default_value_t = 300.0, value_parser = positive_seconds)]
    pub max_wait: f64,
    /// First backoff delay in milliseconds; it doubles per retry, with jitter.
    #[arg(long, default_value_t = 500, hide = true)]
    pub retry_base_ms: u64,
}

impl ConnectionArgs {
    /// The library's connection; `missing` is the error when no endpoint was given.
    pub fn connection(&self, missing: &str) -> Result<Connection> {
        let (Some(endpoint), Some(model)) = (&self.endpoint, &self.model) else {
            anyhow::bail!("{missing}");
        };
        Ok(Connection {
            endpoint: endpoint.clone(),
            model: model.clone(),
            api_key_env: self.api_key_env.clone(),
            concurrency: self.concurrency,
            max_retries: self.max_retries,
            timeout: Duration::from_secs_f64(self.timeout),
            retry_base: Duration::from_millis(self.retry_base_ms),
            max_wait: Duration::from_secs_f64(self.max_wait),
        })
    }
}

/// How continuations are decoded.
#[derive(clap::Args, Clone)]
pub struct DecodingArgs {
    /// The most tokens generated per prompt.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 decodes greedily.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    pub temperature: f64,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sample within the smallest set of tokens whose probability reaches p.
    #[arg(long, default_value_t = 1.0, value_parser = probability)]
    pub top_p: f64,
    /// The sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the text contains this; repeat for several.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Recompute the whole prefix for every token (slow; for comparison).
    #[arg(long)]
    pub no_cache: bool,
}

impl DecodingArgs {
    /// The library's decoding settings.
    pub fn config(&self) -> GenerationConfig {
        GenerationConfig {
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

/// Prints `value` as pretty JSON on stdout.
pub fn print_json(value: &impl serde::Serialize) -> Result<()> {
    // In an `mpirun` job every rank holds the result; rank 0 tells it once.
    if !ual::cluster::world().is_root() {
        return Ok(());
    }
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A finite number ≥ 0.
fn non_negative(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{text:?} is not a finite number ≥ 0")),
    }
}

/// A probability in (0, 1].
fn probability(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 1.0 => Ok(v),
        _ => Err(format!("{text:?} is not a probability in (0, 1]")),
    }
}

/// A finite number of seconds above 0 and at most a day.
fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!("{text:?} is not a number of seconds in (0, 86400]")),
    }
}

/// Keeps the Vulkan loader's window-system probes quiet on a headless machine.
///
/// Probing for a Wayland display, libwayland prints `error: XDG_RUNTIME_DIR is invalid or not
/// set in the environment.` when that variable is missing, which reads as ual failing. ual
/// never opens a window, so pointing the variable at the temporary directory changes nothing
/// but the message; `ual devices` reports the same adapters.
pub fn quiet_window_system_probes() {
    let valid =
        std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|dir| PathBuf::from(dir).is_absolute());
    if !valid {
        // SAFETY: called first thing in `main`, before any other thread exists.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir()) };
    }
}
