//! # ual — uncertainty-aware learning
//!
//! Supervised fine-tuning of LLaMA-family language models where each sample's label-smoothing
//! value comes from that sample's uncertainty (Wang et al., "Uncertainty Aware Learning for
//! Language Model Alignment", ACL 2024), on any wgpu adapter or on the CPU.
//!
//! Each module depends only on those before it here: `ops` (the hand-written kernels),
//! `gguf` (llama.cpp's file format), `device` and `cluster` (the ranks of an `mpirun` job) at the
//! bottom; then `uncertainty` (a score becomes ε), `data` (examples become
//! samples), `model`, `loss` (the UAL loss and the training objective), `train`; and the
//! commands' libraries on top: `eval`, `annotate`, `bench`.
#![warn(missing_docs)]

pub mod alloc;
pub mod annotate;
pub mod bench;
pub mod cluster;
pub mod data;
pub mod device;
pub mod eval;
pub mod gguf;
pub mod judge;
pub mod loss;
pub mod model;
pub mod ops;
pub mod study;
pub mod train;
pub mod uncertainty;
pub mod util;
