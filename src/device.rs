//! Device selection: `--device auto|cpu|wgpu[:N]`.
//!
//! `auto` takes the first wgpu adapter (Vulkan, Metal, DX12 or GL, in that order of preference)
//! and falls back to the CPU (`flex`). `wgpu:N` picks the N-th adapter of `ual devices`'s list on
//! the graphics API that wgpu itself settles on. Each wgpu device is brought up through
//! `ops::wgsl`, which keeps its handles for our kernels, and is described with the shader
//! compiler cubecl chose for it.

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};
use burn::tensor::wgpu::wgpu;
use burn::tensor::{Device, DeviceKind};

use crate::ops::wgsl::{self, Compiler};

/// What the user asked for with `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The first hardware wgpu adapter, else the CPU.
    #[default]
    Auto,
    /// The CPU (burn-flex).
    Cpu,
    /// The N-th adapter of `ual devices`'s list.
    Wgpu(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "wgpu" => Ok(Self::Wgpu(0)),
            _ => s
                .strip_prefix("wgpu:")
                .and_then(|n| n.parse().ok())
                .map(Self::Wgpu)
                .ok_or_else(|| format!("invalid device {s:?}: expected auto, cpu, wgpu or wgpu:N")),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Wgpu(n) => write!(f, "wgpu:{n}"),
        }
    }
}

/// Written as its text (`auto`, `cpu`, `wgpu:N`), as configurations hold it.
impl serde::Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One wgpu adapter as `ual devices` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterReport {
    /// Position in `ual devices`'s list.
    pub index: usize,
    /// The adapter's name.
    pub name: String,
    /// The graphics API (Vulkan, Metal, DX12, GL).
    pub backend: String,
    /// Discrete, integrated, virtual or CPU (software).
    pub device_type: String,
    /// Whether shaders may use f16.
    pub shader_f16: bool,
    /// The largest storage buffer one shader may bind, in bytes (ARCHITECTURE §6).
    pub max_storage_buffer_binding_size: u64,
    #[serde(skip)]
    kind: Option<DeviceKind>,
    /// A software rasterizer running on the CPU (lavapipe, WARP), not a GPU.
    #[serde(skip)]
    software: bool,
}

/// What a device can compute in, for `model::precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceTypes {
    /// A wgpu adapter (else the CPU).
    pub is_wgpu: bool,
    /// The adapter has SHADER_F16.
    pub shader_f16: bool,
    /// Its compiler does arithmetic in bf16 (MSL only; WGSL has no bf16, and SPIR-V only
    /// converts and stores it).
    pub bf16_arithmetic: bool,
}

/// A device ready for tensors, with a human-readable description of what was chosen.
#[derive(Debug, Clone)]
pub struct Selected {
    /// The burn device.
    pub device: Device,
    /// What was chosen, in words.
    pub description: String,
    /// A wgpu adapter (rather than the CPU).
    pub is_wgpu: bool,
    /// A wgpu adapter that is real hardware, not a software rasterizer running on the CPU.
    pub hardware_gpu: bool,
    /// Whether shaders may use f16 (always false on the CPU, where f16 is emulated).
    pub shader_f16: bool,
    /// The largest buffer one shader may bind (ARCHITECTURE §6); `None` on the CPU.
    pub max_binding_bytes: Option<u64>,
    /// The shader compiler of a wgpu adapter; `None` on the CPU.
    pub compiler: Option<Compiler>,
}

impl Selected {
    /// The element types the device computes in, for a run's `precision`.
    pub fn types(&self) -> DeviceTypes {
        DeviceTypes {
            is_wgpu: self.is_wgpu,
            shader_f16: self.shader_f16,
            bf16_arithmetic: self.compiler == Some(Compiler::Msl),
        }
    }

    /// How many rows of a `[rows, width]` f32 tensor fit in one binding.
    pub fn rows_per_binding(&self, width: usize) -> usize {
        match self.max_binding_bytes {
            Some(limit) => ((limit / (width as u64 * 4)) as usize).max(1),
            None => usize::MAX,
        }
    }
}

/// The graphics APIs wgpu may use, in the order cubecl prefers them.
const BACKENDS: [wgpu::Backend; 4] = [
    wgpu::Backend::Vulkan,
    wgpu::Backend::Metal,
    wgpu::Backend::Dx12,
    wgpu::Backend::Gl,
];

/// Lists the adapters of the first graphics API that has any (the one burn will use).
pub fn adapters() -> Vec<AdapterReport> {
    BACKENDS
        .iter()
        .map(|&backend| adapters_on(backend))
        .find(|list| !list.is_empty())
        .unwrap_or_default()
}

fn adapters_on(backend: wgpu::Backend) -> Vec<AdapterReport> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: backend.into(),
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let found = pollster::block_on(instance.enumerate_adapters(backend.into()));
    let mut per_type: Vec<(wgpu::DeviceType, usize)> = Vec::new();
    found
        .iter()
        .enumerate()
        .map(|(index, adapter)| {
            let info = adapter.get_info();
            // burn addresses an adapter as the n-th one of its type.
            let nth = per_type
                .iter()
                .filter(|(t, _)| *t == info.device_type)
                .count();
            per_type.push((info.device_type, index));
            let kind = match info.device_type {
                wgpu::DeviceType::DiscreteGpu => Some(DeviceKind::DiscreteGpu(nth)),
                wgpu::DeviceType::IntegratedGpu => Some(DeviceKind::IntegratedGpu(nth)),
                wgpu::DeviceType::VirtualGpu => Some(DeviceKind::VirtualGpu(nth)),
                wgpu::DeviceType::Cpu => Some(DeviceKind::Cpu),
                wgpu::DeviceType::Other => None,
            };
            AdapterReport {
                index,
                name: info.name.clone(),
                backend: format!("{:?}", info.backend),
                device_type: format!("{:?}", info.device_type),
                shader_f16: adapter.features().contains(wgpu::Features::SHADER_F16),
                max_storage_buffer_binding_size: adapter.limits().max_storage_buffer_binding_size,
                kind,
                software: info.device_type == wgpu::DeviceType::Cpu,
            }
        })
        .collect()
}

/// Resolves `--device` to a burn device, saying which one was chosen.
pub fn select(spec: DeviceSpec) -> Result<Selected> {
    select_for_rank(spec, 0)
}

/// [`select`] for the rank that is `local_rank`-th on its machine in an `mpirun` job, one
/// process per device as torchrun runs them. `auto` gives it the `local_rank`-th hardware GPU
/// (the order of `ual devices`), or the CPU where the machine has none; a machine with some GPUs
/// but fewer than its ranks is refused. `cpu` and `wgpu:N` mean the same on every rank.
pub fn select_for_rank(spec: DeviceSpec, local_rank: usize) -> Result<Selected> {
    if spec == DeviceSpec::Auto && local_rank > 0 {
        let gpus: Vec<AdapterReport> = adapters().into_iter().filter(|a| !a.software).collect();
        return match gpus.get(local_rank).and_then(wgpu_device) {
            Some(selected) => selected,
            None if gpus.is_empty() => select_for_rank(DeviceSpec::Cpu, 0),
            None => bail!(
                "local rank {local_rank} has no GPU of its own: this machine has {} hardware adapter(s) (`ual devices`); start at most that many ranks per machine (mpirun --map-by ppr:{}:node), or pass --device cpu",
                gpus.len(),
                gpus.len()
            ),
        };
    }
    select_one(spec)
}

fn select_one(spec: DeviceSpec) -> Result<Selected> {
    let cpu = || {
        // flex's tensors live on the heap: reuse freed buffers instead of re-faulting pages.
        // Only here, so GPU drivers keep glibc's defaults for their own host memory.
        crate::alloc::keep_freed_buffers();
        Selected {
            device: Device::flex(),
            description: "cpu (flex)".to_string(),
            is_wgpu: false,
            hardware_gpu: false,
            shader_f16: false,
            max_binding_bytes: None,
            compiler: None,
        }
    };
    match spec {
        DeviceSpec::Cpu => Ok(cpu()),
        // A software adapter (lavapipe, WARP) runs shaders on the CPU, slower than flex does the
        // same work, so `auto` wants a real GPU and otherwise takes the CPU. `wgpu` still
        // reaches a software adapter, which is how CI exercises the shaders.
        DeviceSpec::Auto => Ok(adapters()
            .into_iter()
            .filter(|a| !a.software)
            .find_map(|a| wgpu_device(&a))
            .transpose()?
            .unwrap_or_else(|| {
                let mut selected = cpu();
                selected
                    .description
                    .push_str(" (no hardware wgpu adapter; software ones are slower than flex)");
                selected
            })),
        DeviceSpec::Wgpu(n) => {
            let list = adapters();
            let Some(adapter) = list.get(n) else {
                bail!(
                    "no wgpu adapter {n}: {} found (see `ual devices`; on Linux install mesa-vulkan-drivers)",
                    list.len()
                );
            };
            match wgpu_device(adapter) {
                Some(selected) => selected,
                None => bail!(
                    "wgpu adapter {n} ({}) has a device type burn cannot address",
                    adapter.name
                ),
            }
        }
    }
}

/// Lets a software adapter run under SPIR-V or MSL anyway (see [`software_spirv_refusal`]),
/// for a newer lavapipe than the one that crashed.
pub const ALLOW_SOFTWARE_SPIRV: &str = "UAL_ALLOW_SOFTWARE_SPIRV";

/// Brings up the adapter (see `ops::wgsl::acquire`); `None` for a type burn cannot address.
fn wgpu_device(adapter: &AdapterReport) -> Option<Result<Selected>> {
    let kind = adapter.kind.clone()?;
    Some(wgsl::acquire(kind).and_then(|(device, compiler)| {
        let allowed = std::env::var(ALLOW_SOFTWARE_SPIRV).as_deref() == Ok("1");
        if let Some(refusal) = software_spirv_refusal(adapter, compiler, allowed) {
            bail!(refusal);
        }
        Ok(selected(adapter, device, compiler))
    }))
}

/// Why a software adapter is refused under a native compiler, if it is. Mesa 22.3's lavapipe
/// (Debian 12) segfaults while building burn's SPIR-V matmul pipelines, so rather than crash
/// mid-run, ual says so at selection.
fn software_spirv_refusal(
    adapter: &AdapterReport,
    compiler: Compiler,
    allowed: bool,
) -> Option<String> {
    (adapter.software && compiler != Compiler::Wgsl && !allowed).then(|| {
        format!(
            "wgpu:{} ({}) is a software adapter whose compiler in this build is {compiler}, which Mesa's lavapipe crashes on in burn's own kernels; use --device cpu (faster on the same cores), or build with --no-default-features for WGSL (set {ALLOW_SOFTWARE_SPIRV}=1 to try anyway)",
            adapter.index, adapter.name
        )
    })
}

fn selected(adapter: &AdapterReport, device: Device, compiler: Compiler) -> Selected {
    Selected {
        device,
        description: format!(
            "wgpu:{} {} ({}, {}, {compiler})",
            adapter.index, adapter.name, adapter.backend, adapter.device_type
        ),
        is_wgpu: true,
        hardware_gpu: !adapter.software,
        shader_f16: adapter.shader_f16,
        max_binding_bytes: Some(adapter.max_storage_buffer_binding_size),
        compiler: Some(compiler),
    }
}

/// The compiler each adapter gets, for `ual devices`: each is brought up to find out.
pub fn compilers(adapters: &[AdapterReport]) -> Vec<Option<Compiler>> {
    adapters
        .iter()
        .map(|a| wgsl::acquire(a.kind.clone()?).ok().map(|(_, c)| c))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_specs() {
        assert_eq!("auto".parse(), Ok(DeviceSpec::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("wgpu".parse(), Ok(DeviceSpec::Wgpu(0)));
        assert_eq!("wgpu:2".parse(), Ok(DeviceSpec::Wgpu(2)));
        assert!("cuda".parse::<DeviceSpec>().is_err());
        assert!("wgpu:x".parse::<DeviceSpec>().is_err());
    }

    fn adapter(software: bool) -> AdapterReport {
        AdapterReport {
            index: 0,
            name: "llvmpipe".into(),
            backend: "Vulkan".into(),
            device_type: "Cpu".into(),
            shader_f16: true,
            max_storage_buffer_binding_size: 1 << 27,
            kind: Some(DeviceKind::Cpu),
            software,
        }
    }

    #[test]
    fn only_a_software_adapter_under_a_native_compiler_is_refused() {
        let refused = |software, compiler, allowed| {
            software_spirv_refusal(&adapter(software), compiler, allowed).is_some()
        };
        assert!(refused(true, Compiler::Spirv, false));
        assert!(refused(true, Compiler::Msl, false));
        assert!(!refused(true, Compiler::Spirv, true));
        assert!(!refused(true, Compiler::Wgsl, false));
        assert!(!refused(false, Compiler::Spirv, false));
        let message = software_spirv_refusal(&adapter(true), Compiler::Spirv, false).unwrap();
        assert!(message.contains("--device cpu") && message.contains(ALLOW_SOFTWARE_SPIRV));
    }
}
