//! Loading Hugging Face safetensors checkpoints, single-file or sharded.
//!
//! Files are memory-mapped and each tensor is converted to f32 on its own, so peak host memory is
//! the mapped pages in use plus one tensor, never a second copy of the whole checkpoint.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Param;
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::tensor::{DType, Device, Tensor, TensorData};
use memmap2::Mmap;
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, Metadata};

use super::config::ModelConfig;
use super::llama::{Attention, DecoderLayer, Llama, Mlp};
use super::lora::{LoraLinear, Weight};
use super::names::{self, PROJECTIONS};
use super::param::param;
use super::precision::{Frozen, Resolved};
use super::rope::RotaryHalf;
use crate::ops::quant::blocks::{Block, BlockFormat};
use crate::ops::quant::{BLOCK, PackedWeight, blocks};

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

struct Shard {
    path: PathBuf,
    map: Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// The safetensors files of a model directory, their tensors looked up by Hugging Face name.
pub struct SafetensorsFile {
    shards: Vec<Shard>,
    location: HashMap<String, usize>,
}

impl SafetensorsFile {
    /// Opens `model.safetensors`, or every shard listed in `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        let files = if index.exists() {
            shard_files(&index)?
        } else if dir.join(SINGLE_FILE).exists() {
            vec![dir.join(SINGLE_FILE)]
        } else {
            bail!("{}: no {SINGLE_FILE} or {INDEX_FILE}", dir.display());
        };
        Self::open_files(files)
    }

    fn open_files(files: Vec<PathBuf>) -> Result<Self> {
        let mut shards = Vec::new();
        let mut location = HashMap::new();
        for path in files {
            let file =
                File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
            // SAFETY: the checkpoint is read-only input; a concurrent writer is outside our contract.
            let map = unsafe { Mmap::map(&file) }
                .with_context(|| format!("cannot map {}", path.display()))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&map)
                .with_context(|| format!("{}: not a valid safetensors file", path.display()))?;
            for name in metadata.tensors().keys() {
                location.insert(name.clone(), shards.len());
            }
            shards.push(Shard {
                path,
                map,
                header_len,
                metadata,
            });
        }
        Ok(Self { shards, location })
    }

    /// Opens one safetensors file.
    pub fn open_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!("{}: file not found", path.display());
        }
        Self::open_files(vec![path.to_path_buf()])
    }

    /// The names of every tensor, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.location.keys().map(String::as_str)
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// Reads tensor `name` as f32, checking that its shape is `shape`.
    pub fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let shard = self.shard_of(name)?;
        let info = shard
            .metadata
            .info(name)
            .expect("indexed tensor has metadata");
        if info.shape != shape {
            bail!(
                "{}: tensor `{name}` has shape {:?}, expected {shape:?}",
                shard.path.display(),
                info.shape
            );
        }
        let start = 8 + shard.header_len + info.data_offsets.0;
        let end = 8 + shard.header_len + info.data_offsets.1;
        let values = to_f32(&shard.map[start..end], info.dtype)
            .with_context(|| format!("{}: tensor `{name}`", shard.path.display()))?;
        // A NaN or an infinity in a weight poisons every output silently (null log-probs, an
        // empty generation, a merged model carrying it): refused where it enters.
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            bail!(
                "{}: tensor `{name}` holds a non-finite value ({}) at index {i}",
                shard.path.display(),
                values[i]
            );
        }
        Ok(values)
    }

    /// The dtype tensor `name` is stored in.
    pub fn dtype(&self, name: &str) -> Result<Dtype> {
        let shard = self.shard_of(name)?;
        Ok(shard
            .metadata
            .info(name)
            .expect("indexed tensor has metadata")
            .dtype)
    }

    fn shard_of(&self, name: &str) -> Result<&Shard> {
        match self.location.get(name) {
            Some(&i) => Ok(&self.shards[i]),
            None => bail!(
                "{}: tensor `{name}` is missing from the checkpoint",
                self.shards
                    .first()
                    .map(|s| s.path.display().to_string())
                    .unwrap_or_default()
            ),
        }
    }
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let parsed: Index = serde_json::from_str(&text)
        .with_context(|| format!("{}: field `weight_map` missing or invalid", index.display()))?;
    let mut files: Vec<String> = parsed.weight_map.into_values().collect();
    files.sort();
    files.dedup();
    let dir = index.parent().unwrap_or(Path::new("."));
    files
        .into_iter()
        .map(|f| {
            let path = dir.join(&f);
            if path.exists() {
                Ok(path)
            } else {
                bail!(
                    "{}: shard {f} listed in `weight_map` does not exist",
                    index.display()
                )
            }
        })
        .collect()
}

fn to_f32(bytes: &[u8], dtype: Dtype) -> Result<Vec<f32>> {
    let words = |n: usize| bytes.chunks_exact(n);
    Ok(match dtype {
        Dtype::F32 => words(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F64 => words(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8-byte chunk")) as f32)
            .collect(),
        Dtype::F16 => words(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => words(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => bail!("unsupported dtype {other:?}; supported: F32, F16, BF16, F64"),
    })
}

/// Where the decoder's tensors come from, by Hugging Face name and in Hugging Face layout.
pub trait Weights {
    /// Tensor `name` as f32, which must have `shape`.
    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;

    /// The half type (f16 or bf16) tensor `name` is stored in, if it is stored in one: the
    /// type its f32 values convert back to without loss.
    fn half_type(&self, _name: &str) -> Option<DType> {
        None
    }

    /// Tensor `name` as `format` blocks, row by row, if it is stored in exactly that format
    /// (a GGUF file's Q8_0 projection read for a `q8_0` base), so that it is not requantized.
    fn blocks(
        &self,
        _name: &str,
        _shape: &[usize],
        _format: BlockFormat,
    ) -> Result<Option<Vec<Block>>> {
        Ok(None)
    }
}

impl Weights for SafetensorsFile {
    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        SafetensorsFile::read(self, name, shape)
    }

    fn half_type(&self, name: &str) -> Option<DType> {
        match self.dtype(name).ok()? {
            Dtype::F16 => Some(DType::F16),
            Dtype::BF16 => Some(DType::BF16),
            _ => None,
        }
    }
}

/// A checkpoint that remembers which tensors were read, so that tensors the model never read
/// (a `num_hidden_layers` smaller than the checkpoint's, a foreign architecture) are an error
/// rather than silently dropped.
pub struct Recorded<'a> {
    checkpoint: &'a SafetensorsFile,
    read: std::cell::RefCell<std::collections::HashSet<String>>,
}

impl<'a> Recorded<'a> {
    /// Nothing read yet.
    pub fn new(checkpoint: &'a SafetensorsFile) -> Self {
        Self {
            checkpoint,
            read: Default::default(),
        }
    }

    /// Fails naming the first tensor of the checkpoint that the model did not read. Rotary
    /// frequency buffers (older Llama checkpoints) and a tied model's saved head are not weights
    /// of their own.
    pub fn check_all_used(&self, dir: &Path, config: &ModelConfig) -> Result<()> {
        let read = self.read.borrow();
        let mut stray: Vec<&str> = self
            .checkpoint
            .names()
            .filter(|n| !read.contains(*n) && !n.ends_with("rotary_emb.inv_freq"))
            .filter(|n| !(config.tie_word_embeddings && *n == format!("{}.weight", names::HEAD)))
            .collect();
        stray.sort();
        if let Some(first) = stray.first() {
            bail!(
                "{}: tensor `{first}` (and {} more) is not part of the model config.json describes ({} layers); check `num_hidden_layers` and `model_type`",
                dir.display(),
                stray.len() - 1,
                config.num_hidden_layers
            );
        }
        Ok(())
    }
}

impl Weights for Recorded<'_> {
    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.read.borrow_mut().insert(name.to_string());
        self.checkpoint.read(name, shape)
    }

    fn half_type(&self, name: &str) -> Option<DType> {
        self.checkpoint.half_type(name)
    }
}

/// Seeded random weights for benchmarks: HF's initialisation scale (uniform with standard
/// deviation `std`), norms at one, biases at zero. Each tensor depends only on (seed, name).
pub struct RandomWeights {
    /// Seeds every tensor (with its name).
    pub seed: u64,
    /// The standard deviation of the weights.
    pub std: f32,
    /// The half type the checkpoint is taken to store its tensors in (the Hub's LLaMA
    /// checkpoints are f16 or bf16), or `None` for f32.
    pub half: Option<DType>,
}

impl Weights for RandomWeights {
    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        use rayon::prelude::*;
        let len = shape.iter().product::<usize>();
        if name.ends_with("norm.weight") {
            return Ok(vec![1.0; len]);
        }
        if name.ends_with(".bias") {
            return Ok(vec![0.0; len]);
        }
        let stream = super::param::stable_id(name) ^ self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let half_width = self.std * 3f32.sqrt();
        Ok((0..len as u64)
            .into_par_iter()
            .map(|i| {
                let u = (splitmix64(stream.wrapping_add(i)) >> 40) as f32 / (1u32 << 24) as f32;
                (2.0 * u - 1.0) * half_width
            })
            .collect())
    }

    fn half_type(&self, _name: &str) -> Option<DType> {
        self.half
    }
}

fn splitmix64(x: u64) -> u64 {
    let x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Builds the decoder of `config` from `weights` on `device`, the projections stored as
/// `types.frozen` says, the embeddings and head as `types.kept_halves` allows, and everything
/// else in f32. Each tensor is converted (or quantized) as it is read, so a checkpoint never
/// exists in f32 as a whole.
pub fn load_llama(
    config: &ModelConfig,
    weights: &dyn Weights,
    device: &Device,
    types: Resolved,
) -> Result<Llama> {
    let loader = Loader {
        checkpoint: weights,
        device,
        types,
        unpacked: Default::default(),
    };
    let c = config;
    let layers = (0..c.num_hidden_layers)
        .map(|i| loader.layer(c, &super::names::layer(i)))
        .collect::<Result<Vec<_>>>()?;
    let lm_head = if c.tie_word_embeddings {
        None
    } else {
        let kept = loader.kept(&format!("{}.weight", names::HEAD));
        Some(loader.linear(names::HEAD, c.hidden_size, c.vocab_size, false, kept)?)
    };
    loader.say_unpacked();
    let embed = format!("{}.weight", names::EMBED);
    Ok(Llama {
        embed_tokens: Embedding {
            weight: param(
                &embed,
                loader.tensor2(&embed, [c.vocab_size, c.hidden_size], loader.kept(&embed))?,
            ),
        },
        layers,
        norm: loader.rms_norm(names::NORM, c)?,
        lm_head,
        config: c.clone(),
        activations: burn::tensor::DType::F32,
        rope: RotaryHalf::new(c),
    })
}

struct Loader<'a> {
    checkpoint: &'a dyn Weights,
    device: &'a Device,
    types: Resolved,
    /// Projections that were to be packed but whose rows are not whole blocks.
    unpacked: std::cell::RefCell<Vec<String>>,
}

impl Loader<'_> {
    /// One line for the projections kept dense under a quantized base.
    fn say_unpacked(&self) {
        let names = self.unpacked.borrow();
        if let (Some(first), Frozen::Packed(format, dense)) = (names.first(), self.types.frozen) {
            eprintln!(
                "note: {} projection(s), {first} first, have rows that are not whole {BLOCK}-value blocks; they stay {dense:?} instead of {} (as llama.cpp's quantizer falls back)",
                names.len(),
                format.name()
            );
        }
    }

    /// The type the embedding or head `name` is kept in: the half type the checkpoint stores
    /// it in where `self.types` keeps that type, else f32.
    fn kept(&self, name: &str) -> DType {
        self.types.embedding_dtype(self.checkpoint.half_type(name))
    }

    /// `values` on the device in `dtype`, converted on the host, so that a half tensor never
    /// exists on the device in f32 (a 7B head would be 0.5 GB more at load).
    fn upload<const D: usize>(
        &self,
        values: Vec<f32>,
        shape: [usize; D],
        dtype: DType,
    ) -> Tensor<D> {
        let data = TensorData::new(values, shape).convert_dtype(dtype);
        Tensor::from_data(data, (self.device, dtype))
    }

    fn tensor2(&self, name: &str, shape: [usize; 2], dtype: DType) -> Result<Tensor<2>> {
        let values = self.checkpoint.read(name, &shape)?;
        Ok(self.upload(values, shape, dtype))
    }

    fn tensor1(&self, name: &str, len: usize) -> Result<Tensor<1>> {
        let values = self.checkpoint.read(name, &[len])?;
        Ok(Tensor::from_data(
            TensorData::new(values, [len]),
            self.device,
        ))
    }

    /// A Hugging Face `[out, in]` projection, stored in burn's `[in, out]` layout, its weight
    /// in `dtype`.
    fn linear(
        &self,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        dtype: DType,
    ) -> Result<Linear> {
        let name = format!("{prefix}.weight");
        let hf = self.checkpoint.read(&name, &[d_out, d_in])?;
        let mut transposed = vec![0f32; hf.len()];
        for (o, row) in hf.chunks_exact(d_in).enumerate() {
            for (i, &w) in row.iter().enumerate() {
                transposed[i * d_out + o] = w;
            }
        }
        drop(hf);
        let weight = self.upload(transposed, [d_in, d_out], dtype);
        Ok(Linear {
            weight: param(&name, weight),
            bias: self.bias(prefix, d_out, bias)?,
        })
    }

    /// `{prefix}.bias`, of `d_out` values, when the projection has one.
    fn bias(&self, prefix: &str, d_out: usize, present: bool) -> Result<Option<Param<Tensor<1>>>> {
        if !present {
            return Ok(None);
        }
        let name = format!("{prefix}.bias");
        Ok(Some(param(&name, self.tensor1(&name, d_out)?)))
    }

    /// A decoder projection, its weight stored as `self.types.frozen` says: quantized block by
    /// block as it is read, or dense.
    fn projection(
        &self,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
    ) -> Result<LoraLinear> {
        let name = format!("{prefix}.weight");
        let (format, scales) = match self.types.frozen {
            Frozen::Packed(format, scales) if d_in.is_multiple_of(BLOCK) => (format, scales),
            Frozen::Packed(_, dense) => {
                // As llama.cpp's quantizer does with such a tensor: another type, said aloud.
                self.unpacked.borrow_mut().push(name);
                return self.dense_projection(prefix, d_in, d_out, bias, dense);
            }
            Frozen::Dense(dtype) => return self.dense_projection(prefix, d_in, d_out, bias, dtype),
        };
        let packed = match self.checkpoint.blocks(&name, &[d_out, d_in], format)? {
            Some(stored) => stored,
            None => {
                blocks::quantize_rows(format, &self.checkpoint.read(&name, &[d_out, d_in])?, d_in)
            }
        };
        let weight = PackedWeight::new(format, &packed, [d_out, d_in], scales, self.device);
        Ok(LoraLinear {
            weight: Weight::Packed(weight),
            bias: self.bias(prefix, d_out, bias)?,
            lora: None,
        })
    }

    fn dense_projection(
        &self,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        dtype: DType,
    ) -> Result<LoraLinear> {
        let mut proj = LoraLinear::from(self.linear(prefix, d_in, d_out, bias, DType::F32)?);
        proj.store_frozen_in(dtype);
        Ok(proj)
    }

    fn rms_norm(&self, prefix: &str, c: &ModelConfig) -> Result<RmsNorm> {
        Ok(RmsNorm {
            gamma: param(
                &format!("{prefix}.weight"),
                self.tensor1(&format!("{prefix}.weight"), c.hidden_size)?,
            ),
            epsilon: c.rms_norm_eps,
        })
    }

    /// Decoder layer `prefix`, its projections named by [`PROJECTIONS`].
    fn layer(&self, c: &ModelConfig, prefix: &str) -> Result<DecoderLayer> {
        let mut projections = Vec::with_capacity(PROJECTIONS.len());
        for projection in PROJECTIONS {
            let (d_in, d_out, bias) = projection.shape(c);
            let name = format!("{prefix}.{}", projection.hf);
            projections.push(self.projection(&name, d_in, d_out, bias)?);
        }
        let Ok(
            [
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                gate_proj,
                up_proj,
                down_proj,
            ],
        ) = <[LoraLinear; 7]>::try_from(projections)
        else {
            unreachable!("one projection per name");
        };
        Ok(DecoderLayer {
            input_layernorm: self.rms_norm(&format!("{prefix}.{}", names::INPUT_NORM), c)?,
            self_attn: Attention {
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                num_heads: c.num_attention_heads,
                num_kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
            },
            post_attention_layernorm: self
                .rms_norm(&format!("{prefix}.{}", names::POST_ATTENTION_NORM), c)?,
            mlp: Mlp {
                gate_proj,
                up_proj,
                down_proj,
            },
        })
    }
}
