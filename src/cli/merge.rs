//! `ual merge`: fold a LoRA adapter into its base model.

use std::path::PathBuf;

use anyhow::Result;
use ual::model::Pretrained;
use ual::model::load::SafetensorsFile;

use super::DeviceArg;

/// `ual merge`.
#[derive(clap::Args)]
pub struct Args {
    /// The base model directory.
    #[arg(long)]
    model: PathBuf,
    /// The PEFT adapter directory.
    #[arg(long)]
    adapter: PathBuf,
    /// The new model directory (written whole, or not at all); never the model directory.
    #[arg(long)]
    output: PathBuf,
    /// Write into an --output that exists and is not empty (its other files are kept).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    device: DeviceArg,
}

/// Writes base + adapter as a Hugging Face directory in the base's dtype.
pub fn main(args: Args) -> Result<()> {
    // Refused before any work is done.
    ual::model::save::check_output(&args.model, &args.output, args.force)?;
    let selected = args.device.select()?;
    // The checkpoint's own weights, never a quantized copy: an adapter trained on a q8_0/q4_0
    // base is an ordinary LoRA, as bitsandbytes' QLoRA adapters are.
    eprintln!(
        "merging onto {}'s own weights (read in f32, whatever base_dtype the adapter trained on)",
        args.model.display()
    );
    let pretrained =
        Pretrained::load_with_adapter(&args.model, Some(&args.adapter), &selected.device)?;
    let dtype = SafetensorsFile::open(&args.model)?.dtype("model.embed_tokens.weight")?;
    ual::model::save::save_pretrained(&pretrained.model, &args.model, &args.output, dtype)?;
    eprintln!("wrote {} ({dtype:?})", args.output.display());
    Ok(())
}
