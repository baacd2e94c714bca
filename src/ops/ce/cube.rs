//! Launches of the fused UAL loss kernels (`shaders/ual_ce_*.wgsl`) on wgpu devices.
//!
//! Other CubeCL devices fall back to the host loop: the kernels are WGSL source, which only wgpu
//! takes. On wgpu they run under every compiler (`ops::wgsl`).

use burn::backend::tensor::FloatTensor;
use burn::backend::wgpu::{
    CubeBackend, CubeTensor, KernelSource, SourceTemplate, into_contiguous, kernel_source,
};
use burn::cubecl::prelude::KernelId;
use burn::tensor::DType;
use derive_new::new;

use super::backend::{UalLossBackend, slice_major, sliced_shape, stats_shape};
use super::host;
use crate::ops::wgsl;

kernel_source!(ForwardSource, "../../../shaders/ual_ce_forward.wgsl");
kernel_source!(BackwardSource, "../../../shaders/ual_ce_backward.wgsl");

/// Threads per row. A power of two, as the tree reduction requires; any vocabulary size works.
const WORKGROUP: u32 = 256;
/// The most workgroups one dispatch dimension may hold (WebGPU's guaranteed limit).
const MAX_GROUPS_PER_DIM: usize = 65_535;

#[derive(Debug, Clone, Copy)]
enum Pass {
    Forward,
    Backward,
}

/// One of the two kernels, specialised for the logits' element type.
#[derive(Debug)]
struct UalCeKernel {
    pass: Pass,
    dtype: DType,
}

impl KernelSource for UalCeKernel {
    fn source(&self) -> SourceTemplate {
        let source = match self.pass {
            Pass::Forward => ForwardSource::new().source(),
            Pass::Backward => BackwardSource::new().source(),
        };
        let enable_f16 = if self.dtype == DType::F16 {
            "enable f16;"
        } else {
            ""
        };
        source
            .register("wg", WORKGROUP.to_string())
            .register("elem", self.dtype.name())
            .register("enable_f16", enable_f16)
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info((matches!(self.pass, Pass::Forward), WORKGROUP, self.dtype))
    }

    fn lang(&self) -> &'static str {
        "wgsl"
    }
}

fn is_wgpu(t: &CubeTensor) -> bool {
    matches!(t.device, burn::cubecl::Device::Wgpu(_))
}

/// One workgroup per row, folded into two dimensions past the per-dimension limit.
fn row_groups(rows: usize) -> [u32; 3] {
    let x = rows.clamp(1, MAX_GROUPS_PER_DIM);
    [x as u32, rows.div_ceil(x).max(1) as u32, 1]
}

impl UalLossBackend for CubeBackend {
    fn ual_ce_forward(logits: FloatTensor<Self>, labels: FloatTensor<Self>) -> FloatTensor<Self> {
        if !is_wgpu(&logits) {
            return host::forward::<Self>(logits, labels);
        }
        let logits = into_contiguous(logits);
        let labels = into_contiguous(labels);
        let shape = logits.meta.shape().clone();
        let (rows, vocab) = (shape[0], shape[1]);
        let stats = wgsl::empty(&logits, stats_shape(&shape), DType::F32);
        let info = [rows as u32, vocab as u32];
        launch(Pass::Forward, &logits, &info, [&labels, &stats]);
        stats
    }

    fn ual_ce_backward(
        logits: FloatTensor<Self>,
        labels: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        grad_stats: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        if !is_wgpu(&logits) {
            return host::backward::<Self>(logits, labels, stats, grad_stats);
        }
        backward(logits, labels, stats, grad_stats, 1)
    }

    fn ual_ce_backward_sliced(
        logits: FloatTensor<Self>,
        labels: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        grad_stats: FloatTensor<Self>,
        slices: usize,
    ) -> FloatTensor<Self> {
        if !is_wgpu(&logits) {
            let grad = host::backward::<Self>(logits, labels, stats, grad_stats);
            return slice_major::<Self>(grad, slices);
        }
        backward(logits, labels, stats, grad_stats, slices)
    }
}

/// The backward kernel: the gradient as `[rows, V]`, or slice-major `[slices, rows, V / slices]`.
fn backward(
    logits: CubeTensor,
    labels: CubeTensor,
    stats: CubeTensor,
    grad_stats: CubeTensor,
    slices: usize,
) -> CubeTensor {
    let logits = into_contiguous(logits);
    let labels = into_contiguous(labels);
    let stats = into_contiguous(stats);
    let grad_stats = into_contiguous(grad_stats);
    let shape = logits.meta.shape().clone();
    let (rows, vocab) = (shape[0], shape[1]);
    let out_shape = match slices {
        1 => shape,
        _ => sliced_shape(&shape, &slices),
    };
    let grad = wgsl::empty(&logits, out_shape, logits.dtype);
    let info = [rows as u32, vocab as u32, (vocab / slices) as u32];
    launch(
        Pass::Backward,
        &logits,
        &info,
        [&labels, &stats, &grad_stats, &grad],
    );
    grad
}

/// Launches one kernel, one workgroup per logits row: the bindings are the logits, `others` in
/// the shader's order, then `info`.
fn launch<const N: usize>(pass: Pass, logits: &CubeTensor, info: &[u32], others: [&CubeTensor; N]) {
    let kernel = UalCeKernel {
        pass,
        dtype: logits.dtype,
    };
    let tensors: Vec<&CubeTensor> = std::iter::once(logits).chain(others).collect();
    wgsl::launch(
        kernel,
        WORKGROUP,
        row_groups(logits.meta.shape()[0]),
        &tensors,
        info,
    );
}
