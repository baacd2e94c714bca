//! Our WGSL kernels (`shaders/`) under whichever shader compiler burn's wgpu runtime picks.
//!
//! cubecl runs a WGSL `SourceKernel` only where the adapter's compiler is WGSL. With SPIR-V (on
//! Vulkan) or MSL (on Metal), the compilers that have tensor-core matmuls, it refuses WGSL
//! source, lazily, at read-back. wgpu itself takes WGSL on every graphics API (naga translates
//! it), so there our kernels become wgpu compute pipelines of their own, dispatched on the very
//! queue burn submits to, after burn's pending work is flushed: one queue keeps the order, and
//! the buffers are burn's own (`get_resource`), held while the dispatch is recorded.
//!
//! This needs the wgpu handles behind each burn device, so every wgpu device ual uses is
//! acquired here ([`acquire`]), once per process.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use anyhow::{Result, bail};
use burn::backend::wgpu::{CubeTensor, KernelSource, SourceKernel, WgpuDevice, WgpuSetup, wgpu};
use burn::cubecl::{CubeCount, CubeDim, prelude::KernelId, server::KernelArguments};
use burn::tensor::{Device, DeviceKind};

/// The shader compiler cubecl's wgpu runtime uses on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compiler {
    /// WGSL through naga: every adapter, no matrix instructions.
    Wgsl,
    /// SPIR-V, on Vulkan adapters (cooperative-matrix matmuls where the driver has them).
    Spirv,
    /// Metal Shading Language, on Apple GPUs (simdgroup matrices).
    Msl,
}

impl Compiler {
    /// Reads the runtime's name, which cubecl derives from the compiler it chose for the
    /// adapter (`wgpu<wgsl>`, `wgpu<spirv>`, `wgpu<msl>`).
    pub fn from_runtime_name(name: &str) -> Self {
        match name {
            "wgpu<spirv>" => Self::Spirv,
            "wgpu<msl>" => Self::Msl,
            _ => Self::Wgsl,
        }
    }

    /// Whether cubecl can launch a WGSL `SourceKernel` itself on this compiler.
    pub fn runs_wgsl_source(self) -> bool {
        self == Self::Wgsl
    }
}

impl std::fmt::Display for Compiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Wgsl => "wgsl",
            Self::Spirv => "spirv",
            Self::Msl => "msl",
        })
    }
}

/// The wgpu handles behind one burn device, and the pipelines built on it so far.
struct Shared {
    device: wgpu::Device,
    queue: wgpu::Queue,
    pipelines: HashMap<KernelId, wgpu::ComputePipeline>,
}

/// Every wgpu device this process acquired, by cubecl's name for it.
fn shared() -> &'static Mutex<HashMap<WgpuDevice, Shared>> {
    static SHARED: OnceLock<Mutex<HashMap<WgpuDevice, Shared>>> = OnceLock::new();
    SHARED.get_or_init(Default::default)
}

/// cubecl's name for the device `kind`, as `Device::wgpu(kind)` makes it.
fn wgpu_device_of(kind: &DeviceKind) -> Option<WgpuDevice> {
    use burn::backend::wgpu::WgpuBackend;
    use burn::cubecl::wgpu::WgpuDeviceKind;
    let kind = match *kind {
        DeviceKind::DiscreteGpu(i) => WgpuDeviceKind::DiscreteGpu(i),
        DeviceKind::IntegratedGpu(i) => WgpuDeviceKind::IntegratedGpu(i),
        DeviceKind::VirtualGpu(i) => WgpuDeviceKind::VirtualGpu(i),
        DeviceKind::Cpu => WgpuDeviceKind::Cpu,
        _ => return None,
    };
    Some(WgpuDevice::new(kind).on(WgpuBackend::Auto))
}

/// The burn device for the wgpu adapter `kind`, brought up here so that its wgpu handles are
/// known (see the module's note), and the compiler cubecl chose for it. A device burn brought
/// up before (in a test, say) is reused, and then our kernels run only where its compiler is
/// WGSL.
pub fn acquire(kind: DeviceKind) -> Result<(Device, Compiler)> {
    let Some(key) = wgpu_device_of(&kind) else {
        return Ok((Device::wgpu(kind), Compiler::Wgsl));
    };
    let mut shared = shared().lock().unwrap_or_else(|e| e.into_inner());
    let device = if shared.contains_key(&key) {
        Device::wgpu(kind)
    } else {
        match Device::wgpu_options()
            .device_kind(kind.clone())
            .init_with_setup()
        {
            Ok((device, setup)) => {
                shared.insert(key.clone(), share(setup));
                device
            }
            // Already registered by burn itself: usable, without our handles.
            Err(burn::tensor::wgpu::WgpuInitError::Registration { .. }) => Device::wgpu(kind),
            Err(e) => bail!("the wgpu adapter {kind:?} could not be brought up: {e}"),
        }
    };
    Ok((device, compiler_on(&key)))
}

fn share(setup: WgpuSetup) -> Shared {
    Shared {
        device: setup.device,
        queue: setup.queue,
        pipelines: HashMap::new(),
    }
}

/// The compiler cubecl uses on the brought-up device `key`.
fn compiler_on(key: &WgpuDevice) -> Compiler {
    use burn::backend::wgpu::{AutoCompiler, WgpuRuntime};
    use cubecl_runtime::runtime::Runtime;
    Compiler::from_runtime_name(WgpuRuntime::<AutoCompiler>::client(key).name())
}

/// The compiler a tensor's device uses.
pub fn compiler_of(t: &CubeTensor) -> Compiler {
    Compiler::from_runtime_name(t.client.name())
}

/// Set to 1, our kernels go through wgpu directly even where cubecl could launch them: the path
/// SPIR-V and MSL take, testable on an adapter that runs only WGSL (lavapipe, in CI).
pub const DIRECT_DISPATCH: &str = "UAL_DIRECT_DISPATCH";

/// How many kernels this process dispatched through wgpu directly (for tests to see the path).
pub fn direct_dispatches() -> usize {
    native::DISPATCHES.load(std::sync::atomic::Ordering::Relaxed)
}

/// How many of our kernels this process launched, by either path.
pub fn launches() -> usize {
    LAUNCHES.load(std::sync::atomic::Ordering::Relaxed)
}

static LAUNCHES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn direct_dispatch_forced() -> bool {
    static FORCED: OnceLock<bool> = OnceLock::new();
    *FORCED.get_or_init(|| std::env::var(DIRECT_DISPATCH).as_deref() == Ok("1"))
}

/// A new contiguous tensor on `like`'s device, its values unset (a kernel's output).
pub fn empty(
    like: &CubeTensor,
    shape: burn::tensor::Shape,
    dtype: burn::tensor::DType,
) -> CubeTensor {
    let handle = like.client.empty(shape.num_elements() * dtype.size());
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        shape,
        handle,
        dtype,
    )
}

/// Launches one of our WGSL kernels: `tensors` are bound in order (`@binding(0)` …), then
/// `info` (a `u32` array), and `groups` workgroups of `workgroup` threads run.
pub fn launch<K: KernelSource + 'static>(
    kernel: K,
    workgroup: u32,
    groups: [u32; 3],
    tensors: &[&CubeTensor],
    info: &[u32],
) {
    LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let first = tensors[0];
    if compiler_of(first).runs_wgsl_source() && !direct_dispatch_forced() {
        let info = first.client.create_from_slice(bytemuck::cast_slice(info));
        let buffers = tensors
            .iter()
            .map(|t| t.handle.clone().binding())
            .chain([info.binding()])
            .collect();
        first.client.launch(
            Box::new(SourceKernel::new(kernel, CubeDim::new_1d(workgroup))),
            CubeCount::Static(groups[0], groups[1], groups[2]),
            KernelArguments::new().with_buffers(buffers),
        );
    } else {
        native::dispatch(kernel, groups, tensors, info);
    }
}

mod native {
    use std::num::NonZeroU64;

    use burn::backend::wgpu::{CubeTensor, KernelSource, wgpu};
    use burn::cubecl::wgpu::{AutoCompiler, WgpuServer};
    use wgpu::util::DeviceExt;

    use super::{Shared, shared};

    pub static DISPATCHES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// Builds (once) and dispatches `kernel` with wgpu, on burn's queue, after burn's work.
    pub fn dispatch<K: KernelSource + 'static>(
        kernel: K,
        groups: [u32; 3],
        tensors: &[&CubeTensor],
        info: &[u32],
    ) {
        let first = tensors[0];
        let burn::cubecl::Device::Wgpu(key) = &first.device else {
            unreachable!("only wgpu tensors reach a wgpu compiler")
        };
        // Holding the resources keeps burn from handing their memory to anything else while
        // the dispatch is recorded; once submitted, the queue's order protects them.
        let resources: Vec<_> = tensors
            .iter()
            .map(|t| {
                first
                    .client
                    .get_resource::<WgpuServer<AutoCompiler>>(t.handle.clone())
                    .unwrap_or_else(|e| panic!("a tensor's wgpu buffer is unavailable: {e:?}"))
            })
            .collect();
        first
            .client
            .flush()
            .unwrap_or_else(|e| panic!("burn's queued work failed: {e:?}"));
        let mut all = shared().lock().unwrap_or_else(|e| e.into_inner());
        let Some(shared) = all.get_mut(key) else {
            panic!(
                "the wgpu device {key:?} was not brought up through ual's device selection, so ual's WGSL kernels cannot be dispatched on it (its compiler: {})",
                first.client.name()
            )
        };
        let pipeline = pipeline(shared, kernel);
        let info = shared
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("ual info"),
                contents: bytemuck::cast_slice(info),
                usage: wgpu::BufferUsages::STORAGE,
            });
        let mut entries: Vec<wgpu::BindGroupEntry> = resources
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let r = r.resource();
                wgpu::BindGroupEntry {
                    binding: i as u32,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &r.buffer,
                        offset: r.offset,
                        size: NonZeroU64::new(r.size),
                    }),
                }
            })
            .collect();
        entries.push(wgpu::BindGroupEntry {
            binding: resources.len() as u32,
            resource: info.as_entire_binding(),
        });
        let bind_group = shared.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("ual bindings"),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let mut encoder = shared
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        }
        shared.queue.submit([encoder.finish()]);
        drop(resources);
        DISPATCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The compute pipeline for `kernel`'s specialisation, compiled from its WGSL on first use.
    fn pipeline<K: KernelSource + 'static>(
        shared: &mut Shared,
        kernel: K,
    ) -> wgpu::ComputePipeline {
        let id = kernel.id();
        if let Some(p) = shared.pipelines.get(&id) {
            return p.clone();
        }
        let source = kernel.source().complete();
        let module = shared
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some("ual kernel"),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
        let p = shared
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some("ual kernel"),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            });
        shared.pipelines.insert(id, p.clone());
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_name_says_the_compiler() {
        assert_eq!(Compiler::from_runtime_name("wgpu<wgsl>"), Compiler::Wgsl);
        assert_eq!(Compiler::from_runtime_name("wgpu<spirv>"), Compiler::Spirv);
        assert_eq!(Compiler::from_runtime_name("wgpu<msl>"), Compiler::Msl);
        assert!(Compiler::Wgsl.runs_wgsl_source());
        assert!(!Compiler::Spirv.runs_wgsl_source());
        assert!(!Compiler::Msl.runs_wgsl_source());
    }
}
