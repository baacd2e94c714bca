//! GGUF, the single-file model format of llama.cpp, Ollama and LM Studio: reading its
//! metadata and tensors ([`file`]), decoding its block types ([`dequant`]) and writing it
//! ([`write`]). What the tensors *mean* for a LLaMA decoder lives in `model::gguf`.
//!
//! The format (llama.cpp's `docs/gguf.md`, version 3): a header, typed key/value metadata, one
//! record per tensor (name, dimensions fastest-first, type, offset) and the tensor data, each
//! tensor aligned to `general.alignment` bytes (32 by default). Hand-written: the reader and
//! writer are a few hundred lines, candle-core (which has them) weighs about 150 crates, and
//! `ggus` has no K-quant decoders.

pub mod dequant;
pub mod file;
pub mod tokenizer;
pub mod write;

pub use dequant::GgmlType;
pub use file::{GgufFile, TensorInfo, Value};
pub use write::GgufWriter;

/// Whether `path` names a GGUF file rather than a model directory.
pub fn is_gguf(path: &std::path::Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        && !path.is_dir()
}
