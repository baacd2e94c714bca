//! `ual devices`: the wgpu adapters ual can use, and the shader compiler each gets.

use anyhow::Result;
use ual::device::{self, AdapterReport};
use ual::ops::wgsl::Compiler;

/// `ual devices`.
#[derive(clap::Args)]
pub struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// One line of the listing: the adapter and its compiler (none where it cannot be brought up).
#[derive(serde::Serialize)]
struct Listed {
    #[serde(flatten)]
    adapter: AdapterReport,
    compiler: Option<Compiler>,
}

/// Lists the adapters as a table or JSON.
pub fn main(args: Args) -> Result<()> {
    let adapters = device::adapters();
    let compilers = device::compilers(&adapters);
    let listed: Vec<Listed> = adapters
        .into_iter()
        .zip(compilers)
        .map(|(adapter, compiler)| Listed { adapter, compiler })
        .collect();
    if args.json {
        return super::print_json(&listed);
    }
    if listed.is_empty() {
        println!(
            "no wgpu adapter found; ual will run on the CPU (on Linux, install mesa-vulkan-drivers)"
        );
        return Ok(());
    }
    println!(
        "{:<6} {:<40} {:<8} {:<14} {:<8} {:<5} max binding",
        "device", "name", "backend", "type", "compiler", "f16"
    );
    for Listed {
        adapter: a,
        compiler,
    } in listed
    {
        println!(
            "{:<6} {:<40} {:<8} {:<14} {:<8} {:<5} {} MiB",
            format!("wgpu:{}", a.index),
            a.name,
            a.backend,
            a.device_type,
            compiler.map_or("-".to_string(), |c| c.to_string()),
            if a.shader_f16 { "yes" } else { "no" },
            a.max_storage_buffer_binding_size >> 20
        );
    }
    Ok(())
}
