//! `ual devices`: the wgpu adapters ual can use.

use anyhow::Result;
use ual::device;

/// `ual devices`.
#[derive(clap::Args)]
pub struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Lists the adapters as a table or JSON.
pub fn main(args: Args) -> Result<()> {
    let adapters = device::adapters();
    if args.json {
        return super::print_json(&adapters);
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
