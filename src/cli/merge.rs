//! `ual merge`: fold a LoRA adapter into its base model.

use std::path::PathBuf;

use anyhow::{Result, bail};
use ual::gguf::GgmlType;
use ual::model::Pretrained;

use super::DeviceArg;

/// `ual merge`.
#[derive(clap::Args)]
pub struct Args {
    /// The base model: a Hugging Face directory or a GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// The PEFT adapter directory. Without one, `--format gguf` converts the model as it is.
    #[arg(long, required_unless_present = "format")]
    adapter: Option<PathBuf>,
    /// The new model directory, or with `--format gguf` the new file (written whole, or not at
    /// all); never the model itself.
    #[arg(long)]
    output: PathBuf,
    /// `hf` (a Hugging Face directory in the base's dtype) or `gguf` (one file that llama.cpp,
    /// Ollama and LM Studio load).
    #[arg(long, default_value = "hf", value_parser = ["hf", "gguf"])]
    format: String,
    /// With `--format gguf`: the weights' type, f16, q8_0 or q4_0 (norms stay f32).
    #[arg(long, default_value = "f16", value_parser = ["f16", "q8_0", "q4_0"])]
    dtype: String,
    /// Write into an --output that exists and is not empty (its other files are kept).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    device: DeviceArg,
}

/// Writes base + adapter as a Hugging Face directory in the base's dtype.
pub fn main(args: Args) -> Result<()> {
    // Refused before any work is done.
    if args.format == "gguf" {
        ual::model::save::check_file_output(&args.model, &args.output, args.force)?;
    } else {
        ual::model::save::check_output(&args.model, &args.output, args.force)?;
    }
    let selected = args.device.select()?;
    // The checkpoint's own weights, never a quantized copy: an adapter trained on a q8_0/q4_0
    // base is an ordinary LoRA, as bitsandbytes' QLoRA adapters are.
    eprintln!(
        "merging onto {}'s own weights (read in f32, whatever base_dtype the adapter trained on)",
        args.model.display()
    );
    if args.adapter.is_none() && args.format != "gguf" {
        bail!("--adapter is required, except with --format gguf (which then converts the model)");
    }
    let pretrained =
        Pretrained::load_with_adapter(&args.model, args.adapter.as_deref(), &selected.device)?;
    if args.format == "gguf" {
        let ggml_type = match args.dtype.as_str() {
            "q8_0" => GgmlType::Q8_0,
            "q4_0" => GgmlType::Q4_0,
            _ => GgmlType::F16,
        };
        ual::model::gguf::write_model(&pretrained.model, &args.model, &args.output, ggml_type)?;
        eprintln!("wrote {} ({})", args.output.display(), args.dtype);
        return Ok(());
    }
    let dtype = ual::model::saved_dtype(&args.model)?;
    ual::model::save::save_pretrained(&pretrained.model, &args.model, &args.output, dtype)?;
    eprintln!("wrote {} ({dtype:?})", args.output.display());
    Ok(())
}
