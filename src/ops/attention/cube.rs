//! Launches of the flash-attention kernels (`shaders/ual_attention_*.wgsl`) on wgpu devices,
//! under every compiler (`ops::wgsl`). Other devices, bf16 (which WGSL lacks) and heads wider
//! than [`MAX_DIM`] run the composed ops.
//!
//! Each kernel is specialised for the head width, so a row of q, of the output and of each
//! gradient lives in one invocation's registers, and for the element type (f32 or f16), which
//! is read into f32: scores, softmax sums and gradient sums accumulate in f32 either way.

use burn::backend::TensorMetadata;
use burn::backend::wgpu::{
    CubeBackend, CubeTensor, KernelSource, SourceTemplate, into_contiguous, kernel_source,
};
use burn::cubecl::prelude::KernelId;
use burn::tensor::DType;
use derive_new::new;

use super::{AttentionBackend, composed, grouped, lse_shape};
use crate::ops::wgsl;

kernel_source!(ForwardSource, "../../../shaders/ual_attention_forward.wgsl");
kernel_source!(
    BackwardQSource,
    "../../../shaders/ual_attention_backward_q.wgsl"
);
kernel_source!(
    BackwardKvSource,
    "../../../shaders/ual_attention_backward_kv.wgsl"
);

/// Rows (queries, or keys in the keys' backward) per workgroup, one invocation each.
const ROWS: u32 = 64;
/// The widest head the kernels take: four rows of this many f32 per invocation.
pub const MAX_DIM: usize = 256;
/// Workgroup memory the kernels may use: WebGPU's guaranteed 16 KiB, so every adapter runs them.
const WORKGROUP_BYTES: usize = 16 * 1024;
/// The most workgroups one dispatch dimension may hold (WebGPU's guaranteed limit).
const MAX_GROUPS_PER_DIM: usize = 65_535;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Pass {
    Forward,
    BackwardQ,
    BackwardKv,
}

/// One kernel, specialised for the element type and the head width.
#[derive(Debug)]
struct AttentionKernel {
    pass: Pass,
    dtype: DType,
    dim: usize,
}

impl AttentionKernel {
    /// Rows per tile of workgroup memory: the largest power of two, up to [`ROWS`], for which
    /// two `keys × dim` f32 tiles and two `keys` vectors fit in [`WORKGROUP_BYTES`].
    fn keys(&self) -> usize {
        let fit = (WORKGROUP_BYTES - 16) / (8 * (self.dim + 1));
        let mut keys = 1;
        while keys * 2 <= fit.min(ROWS as usize) {
            keys *= 2;
        }
        keys
    }
}

impl KernelSource for AttentionKernel {
    fn source(&self) -> SourceTemplate {
        let source = match self.pass {
            Pass::Forward => ForwardSource::new().source(),
            Pass::BackwardQ => BackwardQSource::new().source(),
            Pass::BackwardKv => BackwardKvSource::new().source(),
        };
        let enable_f16 = if self.dtype == DType::F16 {
            "enable f16;"
        } else {
            ""
        };
        source
            .register("enable_f16", enable_f16)
            .register("elem", self.dtype.name())
            .register("dim", self.dim.to_string())
            .register("rows", ROWS.to_string())
            .register("keys", self.keys().to_string())
            .register("tile", (self.keys() * self.dim).to_string())
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info((self.pass, self.dtype, self.dim, ROWS))
    }

    fn lang(&self) -> &'static str {
        "wgsl"
    }
}

/// What the kernels need to know of a call, where they apply.
struct Geometry {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    len: usize,
    dim: usize,
    dtype: DType,
}

impl Geometry {
    /// `None` unless q, k and v are wgpu tensors of one element type the kernels take, with
    /// shapes `[b, h, len, d]`, `[b, kv, len, d]` twice, kv dividing h and d ≤ [`MAX_DIM`].
    fn of(q: &CubeTensor, k: &CubeTensor, v: &CubeTensor) -> Option<Self> {
        let (shape, kv) = (q.shape(), k.shape());
        let dtype = q.dtype;
        let fits = matches!(q.device, burn::cubecl::Device::Wgpu(_))
            && matches!(dtype, DType::F32 | DType::F16)
            && k.dtype == dtype
            && v.dtype == dtype
            && grouped(&shape, &kv, &v.shape()).is_some()
            && (1..=MAX_DIM).contains(&shape[3])
            && shape[0] * shape[1] <= MAX_GROUPS_PER_DIM
            && shape[2] < u32::MAX as usize / 2;
        fits.then(|| Self {
            batch: shape[0],
            heads: shape[1],
            kv_heads: kv[1],
            len: shape[2],
            dim: shape[3],
            dtype,
        })
    }

    fn kernel(&self, pass: Pass) -> AttentionKernel {
        AttentionKernel {
            pass,
            dtype: self.dtype,
            dim: self.dim,
        }
    }

    /// (len, heads, kv_heads, window), the window saturated to u32 (none: `u32::MAX`).
    fn info(&self, window: usize) -> [u32; 4] {
        let window = window.min(u32::MAX as usize) as u32;
        [
            self.len as u32,
            self.heads as u32,
            self.kv_heads as u32,
            window,
        ]
    }

    /// One workgroup per block of [`ROWS`] rows of each of `heads` heads of every sequence.
    fn groups(&self, heads: usize) -> [u32; 3] {
        let blocks = self.len.div_ceil(ROWS as usize);
        [blocks as u32, (self.batch * heads) as u32, 1]
    }
}

impl AttentionBackend for CubeBackend {
    fn ual_causal_attention(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        window: usize,
    ) -> (CubeTensor, CubeTensor) {
        let Some(g) = Geometry::of(&q, &k, &v) else {
            return composed::forward::<Self>(q, k, v, window);
        };
        let [q, k, v] = [q, k, v].map(into_contiguous);
        let out = wgsl::empty(&q, q.shape(), g.dtype);
        let lse = wgsl::empty(&q, lse_shape(&q.shape()), DType::F32);
        wgsl::launch(
            g.kernel(Pass::Forward),
            ROWS,
            g.groups(g.heads),
            &[&q, &k, &v, &out, &lse],
            &g.info(window),
        );
        (out, lse)
    }

    fn ual_causal_attention_backward(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        out: CubeTensor,
        lse: CubeTensor,
        grad: CubeTensor,
        window: usize,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        let fits = Geometry::of(&q, &k, &v)
            .filter(|g| out.dtype == g.dtype && grad.dtype == g.dtype && lse.dtype == DType::F32);
        let Some(g) = fits else {
            return composed::backward::<Self>(q, k, v, grad, window);
        };
        let [q, k, v, out, lse, grad] = [q, k, v, out, lse, grad].map(into_contiguous);
        let delta = wgsl::empty(&q, lse_shape(&q.shape()), DType::F32);
        let dq = wgsl::empty(&q, q.shape(), g.dtype);
        let dk = wgsl::empty(&k, k.shape(), g.dtype);
        let dv = wgsl::empty(&v, v.shape(), g.dtype);
        let info = g.info(window);
        wgsl::launch(
            g.kernel(Pass::BackwardQ),
            ROWS,
            g.groups(g.heads),
            &[&q, &k, &v, &out, &lse, &grad, &delta, &dq],
            &info,
        );
        wgsl::launch(
            g.kernel(Pass::BackwardKv),
            ROWS,
            g.groups(g.kv_heads),
            &[&q, &k, &v, &lse, &grad, &delta, &dk, &dv],
            &info,
        );
        (dq, dk, dv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_fit_in_webgpus_workgroup_memory() {
        for dim in [4, 8, 16, 32, 64, 80, 96, 128, 256] {
            let kernel = AttentionKernel {
                pass: Pass::BackwardKv,
                dtype: DType::F32,
                dim,
            };
            let keys = kernel.keys();
            assert!(
                keys.is_power_of_two() && keys <= ROWS as usize,
                "dim {dim}: {keys}"
            );
            assert!(
                (2 * keys * dim + 2 * keys) * 4 + 16 <= WORKGROUP_BYTES,
                "dim {dim}"
            );
            // The next power of two would not fit, unless the rows cap it.
            let next = 2 * keys;
            assert!(next > ROWS as usize || (2 * next * dim + 2 * next) * 4 + 16 > WORKGROUP_BYTES);
        }
    }
}
