//! # ual — uncertainty-aware learning
//!
//! Supervised fine-tuning of LLaMA-family language models where each sample's label-smoothing
//! value comes from that sample's uncertainty (Wang et al., "Uncertainty Aware Learning for
//! Language Model Alignment", ACL 2024), on any wgpu adapter or on the CPU.
//!
//! Data flows one way: `data` → `model` → `loss` → `train`; `uncertainty` only supplies the
//! per-sample number that becomes the smoothing value.

pub mod alloc;
pub mod annotate;
pub mod bench;
pub mod data;
pub mod device;
pub mod eval;
pub mod loss;
pub mod model;
pub mod ops;
pub mod train;
pub mod uncertainty;
pub mod util;
