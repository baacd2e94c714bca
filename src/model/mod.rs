//! LLaMA-family models loaded from Hugging Face directories or GGUF files.

pub mod config;
pub mod generate;
pub mod gguf;
pub mod gguf_vocab;
pub mod llama;
pub mod load;
pub mod lora;
pub mod names;
pub mod param;
pub mod peft;
pub mod precision;
pub mod rope;
pub mod save;

use std::path::{Path, PathBuf};

use anyhow::Result;
use burn::tensor::Device;

pub use crate::data::tokenizer::Tokenizer;
pub use config::ModelConfig;
pub use llama::Llama;

/// The architecture of the model at `path`: a directory's `config.json`, or a GGUF file's
/// metadata.
pub fn read_config(path: &Path) -> Result<ModelConfig> {
    if gguf::is_gguf(path) {
        return gguf::model_config(&crate::gguf::GgufFile::open(path)?);
    }
    ModelConfig::from_file(&path.join("config.json"))
}

/// The dtype a model's own weights are kept in, which merges and full fine-tunes write back:
/// its embedding's for a directory; f16 for a GGUF file, as llama.cpp's converter writes.
pub fn saved_dtype(path: &Path) -> Result<safetensors::Dtype> {
    if gguf::is_gguf(path) {
        return Ok(safetensors::Dtype::F16);
    }
    load::SafetensorsFile::open(path)?.dtype(&format!("{}.weight", names::EMBED))
}

/// A model directory loaded onto a device: the decoder and its tokenizer.
pub struct Pretrained {
    /// The directory (or GGUF file) it was loaded from.
    pub dir: PathBuf,
    /// Its `config.json`.
    pub config: ModelConfig,
    /// The decoder.
    pub model: Llama,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
}

impl Pretrained {
    /// Loads `config.json`, `tokenizer.json` and the safetensors weights of `dir`, in f32.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_as(dir, device, precision::Resolved::F32)
    }

    /// Loads `dir` with its projections stored and its decoder computing as `types` says.
    pub fn load_as(dir: &Path, device: &Device, types: precision::Resolved) -> Result<Self> {
        if gguf::is_gguf(dir) {
            return Self::load_gguf(dir, device, types);
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"), config.vocab_size)?;
        let checkpoint = load::SafetensorsFile::open(dir)?;
        let reading = load::Recorded::new(&checkpoint);
        let model = load::load_llama(&config, &reading, device, types)?;
        reading.check_all_used(dir, &config)?;
        let model = precision::prepare(model, types);
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            model,
            tokenizer,
        })
    }

    /// Loads a GGUF file: its metadata gives the config, tokenizer and chat template, and its
    /// tensors are decoded one at a time into the types `types` says.
    fn load_gguf(path: &Path, device: &Device, types: precision::Resolved) -> Result<Self> {
        let file = crate::gguf::GgufFile::open(path)?;
        let config = gguf::model_config(&file)?;
        let tokenizer = Tokenizer::from_gguf(&file, config.vocab_size)?;
        let reading = gguf::GgufWeights::new(&file, &config);
        let model = load::load_llama(&config, &reading, device, types)?;
        reading.check_all_used()?;
        Ok(Self {
            dir: path.to_path_buf(),
            config,
            model: precision::prepare(model, types),
            tokenizer,
        })
    }

    /// Loads `dir`, then applies the PEFT LoRA adapter in `adapter`, if any, unmerged.
    pub fn load_with_adapter(dir: &Path, adapter: Option<&Path>, device: &Device) -> Result<Self> {
        Self::load_with_adapter_as(dir, adapter, device, precision::Resolved::F32)
    }

    /// [`Self::load_with_adapter`] with the base stored as `types` says.
    pub fn load_with_adapter_as(
        dir: &Path,
        adapter: Option<&Path>,
        device: &Device,
        types: precision::Resolved,
    ) -> Result<Self> {
        let mut pretrained = Self::load_as(dir, device, types)?;
        if let Some(adapter) = adapter {
            pretrained.model = peft::load_peft(pretrained.model, adapter, device)?.0;
        }
        Ok(pretrained)
    }

    /// Continuations of `prompts` (already tokenised), decoded together as `config` says;
    /// prompt `j` is item `first + j` of its input, whose sampling stream it draws from.
    pub fn continue_batch(
        &self,
        prompts: &[Vec<u32>],
        first: usize,
        config: &generate::GenerationConfig,
    ) -> Result<Vec<generate::Generation>> {
        let eos = &self.config.eos_token_ids;
        let streams: Vec<usize> = (first..first + prompts.len()).collect();
        generate::generate(
            &self.model,
            &self.tokenizer,
            eos,
            prompts,
            &streams,
            config,
            |_, _| {},
        )
    }
}
