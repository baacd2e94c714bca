//! The Hugging Face tokenizer of a model directory (`tokenizer.json`).

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};

/// A `tokenizers` tokenizer whose vocabulary is known to fit the model's embedding.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl Tokenizer {
    /// Loads `tokenizer.json`, rejecting a vocabulary larger than the embedding (`vocab_size`).
    pub fn from_file(path: &Path, vocab_size: usize) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        Self::checked(inner, path.to_path_buf(), vocab_size)
    }

    /// The tokenizer a GGUF file's metadata describes.
    pub fn from_gguf(file: &crate::gguf::GgufFile, vocab_size: usize) -> Result<Self> {
        let json = crate::gguf::tokenizer::tokenizer_json(file)?;
        let path = file.path().to_path_buf();
        let inner: tokenizers::Tokenizer = json
            .to_string()
            .parse()
            .map_err(|e| anyhow!("{}: cannot build its tokenizer: {e}", path.display()))?;
        Self::checked(inner, path, vocab_size)
    }

    /// A tokenizer whose token `i` is the word `t{i}`, for models on random weights (benches).
    pub fn numbered(vocab_size: usize) -> Result<Self> {
        let vocab: serde_json::Map<String, serde_json::Value> = (0..vocab_size)
            .map(|i| (format!("t{i}"), serde_json::Value::from(i)))
            .collect();
        let json = serde_json::json!({
            "version": "1.0",
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
            "pre_tokenizer": {"type": "Whitespace"},
        });
        let inner: tokenizers::Tokenizer = json
            .to_string()
            .parse()
            .map_err(|e| anyhow!("a numbered tokenizer: {e}"))?;
        Self::checked(inner, PathBuf::from("(numbered words)"), vocab_size)
    }

    fn checked(inner: tokenizers::Tokenizer, path: PathBuf, vocab_size: usize) -> Result<Self> {
        let vocab = inner.get_vocab_size(true);
        if vocab > vocab_size {
            bail!(
                "{}: tokenizer vocabulary has {vocab} tokens but the model's embedding has only {vocab_size} rows (config.json `vocab_size`)",
                path.display()
            );
        }
        Ok(Self { inner, path })
    }

    /// Token ids of `text` with the tokenizer's own special tokens (e.g. Llama's BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// Token ids of `text`, with or without the post-processor's special tokens.
    pub fn encode_with(&self, text: &str, special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, special_tokens)
            .map_err(|e| anyhow!("{}: cannot encode text: {e}", self.path.display()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of each token id, for readable tables.
    pub fn token_text(&self, id: u32) -> String {
        self.inner
            .id_to_token(id)
            .unwrap_or_else(|| format!("<{id}>"))
    }

    /// The text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow!("{}: cannot decode: {e}", self.path.display()))
    }

    /// The Hugging Face tokenizer underneath.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
