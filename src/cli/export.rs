//! `ual export`: a PEFT LoRA adapter as llama.cpp's LoRA GGUF, which `llama-cli --lora` and
//! Ollama's `ADAPTER` apply to the base model's GGUF.

use std::path::PathBuf;

use anyhow::{Context, Result};
use ual::model::Pretrained;
use ual::model::precision::{Frozen, Resolved};
use ual::ops::quant::blocks::BlockFormat;

use super::DeviceArg;

/// `ual export`.
#[derive(clap::Args)]
pub struct Args {
    /// The PEFT adapter directory.
    #[arg(long)]
    adapter: PathBuf,
    /// The base model the adapter was trained on (default: the adapter's
    /// `base_model_name_or_path`); only its architecture is read into the file.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The format to write: gguf.
    #[arg(long, default_value = "gguf", value_parser = ["gguf"])]
    format: String,
    /// The file to write (atomically).
    #[arg(long)]
    output: PathBuf,
    /// Replace an existing --output.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    device: DeviceArg,
}

/// Writes the adapter's factors under llama.cpp's names.
pub fn main(args: Args) -> Result<()> {
    ual::model::save::check_file_output(&args.adapter, &args.output, args.force)?;
    let model = match args.model {
        Some(model) => model,
        None => ual::model::peft::base_model_of(&args.adapter)?.with_context(|| {
            format!(
                "{}: `base_model_name_or_path` is not set; pass --model",
                args.adapter.display()
            )
        })?,
    };
    let selected = args.device.select()?;
    // Only the factors are written: the base is held in q4_0, its least memory.
    let types = Resolved {
        frozen: Frozen::Packed(BlockFormat::Q4_0, burn::tensor::DType::F32),
        ..Resolved::F32
    };
    let pretrained =
        Pretrained::load_with_adapter_as(&model, Some(&args.adapter), &selected.device, types)?;
    ual::model::gguf::write_adapter(&pretrained.model, &args.output)?;
    eprintln!(
        "wrote {} (LoRA for {})",
        args.output.display(),
        model.display()
    );
    Ok(())
}
