//! From JSONL files to token batches with a response mask and per-token smoothing.

pub mod batch;
pub mod formats;
pub mod template;
pub mod tokenizer;
