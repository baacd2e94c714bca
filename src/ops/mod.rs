//! Every kernel ual writes by hand, one backend trait per operation with one implementation per
//! backend: the fused UAL cross-entropy (`ce`), causal attention (`attention`), the CPU
//! building blocks they share (`lanes`, vectorised row passes; `gemm`, matrices on flex's
//! buffers), and the launch of our WGSL under any wgpu compiler (`wgsl`). Nothing here knows
//! about models or data; the modules above call down into it.

pub mod attention;
pub mod ce;
pub mod gemm;
pub mod lanes;
pub mod quant;
pub mod wgsl;
