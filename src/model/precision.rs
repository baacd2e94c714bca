//! The element types of a model, in one place: what the frozen projections are stored in
//! (`base_dtype`: f32, f16, or llama.cpp's Q8_0/Q4_0 blocks) and what the decoder computes in
//! (`precision`: f32, f16 or bf16). Training, the bench and every command that loads a model
//! resolve them once against the device ([`Dtypes::resolve`]); the loader stores each
//! projection as it reads it, and [`prepare`] sets the rest.
//!
//! What stays f32 in every setting: the LoRA factors, their gradients and AdamW's moments
//! (f16 steps of size lr·g would round away), RMSNorm's statistics (a sum of squares over the
//! hidden width overflows f16), and the head's products and the loss, which accumulates in f32
//! over the vocabulary. The decoder's projections (almost all of a model's weights and FLOPs),
//! attention and the residual stream run in the compute type.
//!
//! The frozen embeddings and head are *stored* in f32, except under a frozen base of less
//! than f32 (`base_dtype` f16, q8_0 or q4_0, or a half `precision`): there they keep the half
//! type the checkpoint stores them in, where the device stores that type
//! ([`Resolved::kept_halves`]). That is lossless, and it is a 7B model's 0.5 GB: an f32
//! embedding and head are 1 GB of Llama-2-7B's 4.4 GB at Q4_0. Each product widens its
//! operand to f32 for the call.

use anyhow::{Result, bail};
use burn::tensor::DType;
use serde::{Deserialize, Serialize};

use super::Llama;
use crate::device::DeviceTypes;
use crate::ops::quant::BlockFormat;

/// The element type the decoder computes in (`precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Precision {
    /// Full precision everywhere.
    #[default]
    #[serde(rename = "f32")]
    F32,
    /// IEEE half: 11 bits of mantissa, range ±65504, so training scales the loss.
    #[serde(rename = "f16")]
    F16,
    /// bfloat16: f32's range with 8 bits of mantissa; needs no loss scale.
    #[serde(rename = "bf16")]
    Bf16,
}

/// How the frozen projection weights are stored (`base_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum BaseDtype {
    /// As the compute type: f32, or the half type of `precision`.
    #[default]
    #[serde(rename = "f32", alias = "float32")]
    F32,
    /// Half precision: half the base model's memory.
    #[serde(rename = "f16", alias = "float16")]
    F16,
    /// llama.cpp's Q8_0: 8.5 bits per weight, quantized at load.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// llama.cpp's Q4_0: 4.5 bits per weight, quantized at load (QLoRA's base).
    #[serde(rename = "q4_0")]
    Q4_0,
}

const PRECISIONS: &str = "\"f32\", \"f16\" or \"bf16\"";
const BASE_DTYPES: &str = "\"f32\", \"f16\", \"q8_0\" or \"q4_0\"";

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!("precision = \"{other}\": expected {PRECISIONS}")),
        }
    }
}

impl std::str::FromStr for BaseDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            "q8_0" => Ok(Self::Q8_0),
            "q4_0" => Ok(Self::Q4_0),
            other => Err(format!("base_dtype = \"{other}\": expected {BASE_DTYPES}")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}

impl std::fmt::Display for BaseDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
        })
    }
}

impl Precision {
    /// Whether training needs a loss scale: f16 only.
    pub fn scales_loss(self) -> bool {
        self == Self::F16
    }
}

impl BaseDtype {
    /// The block format of a quantized base.
    pub fn block_format(self) -> Option<BlockFormat> {
        match self {
            Self::Q8_0 => Some(BlockFormat::Q8_0),
            Self::Q4_0 => Some(BlockFormat::Q4_0),
            Self::F32 | Self::F16 => None,
        }
    }

    /// Whether the base is stored in other than f32: LoRA only, since a full fine-tune trains it.
    pub fn is_reduced(self) -> bool {
        self != Self::F32
    }
}

/// A model's two settings, as a run or a command gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Dtypes {
    /// The frozen projections' storage.
    pub base: BaseDtype,
    /// The compute type.
    pub precision: Precision,
}

/// How one frozen projection is held on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frozen {
    /// A dense `[in, out]` weight of this type.
    Dense(DType),
    /// Blocks of this format, their scales of this type.
    Packed(BlockFormat, DType),
}

/// [`Dtypes`] checked against a device: what the loader stores and the decoder computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    /// The frozen projections.
    pub frozen: Frozen,
    /// The residual stream, attention and the projections' products.
    pub compute: DType,
    /// The half types a checkpoint's embeddings and head are kept in when it stores them in
    /// one (else f32): none unless the frozen base is reduced, then those the device stores.
    pub kept_halves: &'static [DType],
}

impl Resolved {
    /// Everything in f32: what a full fine-tune and `merge` load.
    pub const F32: Self = Self {
        frozen: Frozen::Dense(DType::F32),
        compute: DType::F32,
        kept_halves: &[],
    };

    /// What a tensor the checkpoint stores as `stored` is kept in: its own half type if that
    /// is one of [`Self::kept_halves`], else f32.
    pub fn embedding_dtype(&self, stored: Option<DType>) -> DType {
        match stored {
            Some(half) if self.kept_halves.contains(&half) => half,
            _ => DType::F32,
        }
    }
}

impl Dtypes {
    /// The types on `device`, or one line naming the setting the device cannot run.
    pub fn resolve(self, device: DeviceTypes) -> Result<Resolved> {
        let compute = self.compute(device)?;
        let half_ok = !device.is_wgpu || device.shader_f16;
        let frozen = match (self.base, compute) {
            (BaseDtype::F32, dtype) => Frozen::Dense(dtype),
            (BaseDtype::F16, DType::BF16) => bail!(
                "base_dtype = \"f16\" with precision = \"bf16\": the base is stored in the compute type; leave base_dtype = \"f32\""
            ),
            (BaseDtype::F16, _) if !half_ok => {
                bail!("base_dtype = \"f16\": this adapter lacks SHADER_F16; use \"f32\"")
            }
            (BaseDtype::F16, _) => Frozen::Dense(DType::F16),
            (quantized, _) => {
                let format = quantized.block_format().expect("a quantized base");
                let scales = if half_ok { DType::F16 } else { DType::F32 };
                Frozen::Packed(format, scales)
            }
        };
        let kept_halves: &'static [DType] = match frozen {
            Frozen::Dense(DType::F32) => &[],
            _ if !device.is_wgpu => &[DType::F16, DType::BF16],
            _ if device.shader_f16 && device.bf16_arithmetic => &[DType::F16, DType::BF16],
            _ if device.shader_f16 => &[DType::F16],
            _ => &[],
        };
        Ok(Resolved {
            frozen,
            compute,
            kept_halves,
        })
    }

    fn compute(self, device: DeviceTypes) -> Result<DType> {
        match self.precision {
            Precision::F32 => Ok(DType::F32),
            Precision::F16 if device.is_wgpu && !device.shader_f16 => {
                bail!("precision = \"f16\": this adapter lacks SHADER_F16; use \"f32\"")
            }
            Precision::F16 => Ok(DType::F16),
            Precision::Bf16 if device.is_wgpu && !device.bf16_arithmetic => bail!(
                "precision = \"bf16\": this adapter's shader compiler has no bf16 arithmetic (WGSL has none, SPIR-V only stores it); use \"f16\" or --device cpu"
            ),
            Precision::Bf16 => Ok(DType::BF16),
        }
    }
}

/// The model as `types` says: every dense frozen projection not yet in its type is converted
/// (a model loaded in f32, or a full fine-tune's checkpoint), and the decoder computes in the
/// compute type. Packed projections are made by the loader, which quantizes as it reads.
pub fn prepare(mut model: Llama, types: Resolved) -> Llama {
    if let Frozen::Dense(dtype) = types.frozen {
        for (_, proj) in model.projections_mut() {
            proj.store_frozen_in(dtype);
        }
    }
    model.activations = types.compute;
    model
}

#[cfg(test)]
mod tests {
    use super::*;

    const WGSL: DeviceTypes = DeviceTypes {
        is_wgpu: true,
        shader_f16: true,
        bf16_arithmetic: false,
    };
    const CPU: DeviceTypes = DeviceTypes {
        is_wgpu: false,
        shader_f16: false,
        bf16_arithmetic: false,
    };

    fn types(base: BaseDtype, precision: Precision) -> Dtypes {
        Dtypes { base, precision }
    }

    #[test]
    fn each_precision_asks_for_what_the_device_has() {
        let f16 = types(BaseDtype::F32, Precision::F16);
        assert_eq!(f16.resolve(WGSL).unwrap().compute, DType::F16);
        assert_eq!(f16.resolve(CPU).unwrap().frozen, Frozen::Dense(DType::F16));
        let bf16 = types(BaseDtype::F32, Precision::Bf16);
        assert_eq!(bf16.resolve(CPU).unwrap().compute, DType::BF16);
        let err = bf16.resolve(WGSL).unwrap_err().to_string();
        assert!(err.contains("no bf16 arithmetic"), "{err}");
        let no_f16 = DeviceTypes {
            shader_f16: false,
            ..WGSL
        };
        let err = f16.resolve(no_f16).unwrap_err().to_string();
        assert!(err.contains("SHADER_F16"), "{err}");
        assert!(!Precision::Bf16.scales_loss() && Precision::F16.scales_loss());
    }

    #[test]
    fn a_quantized_base_keeps_f16_scales_where_the_device_has_f16() {
        let q4 = types(BaseDtype::Q4_0, Precision::F32);
        let on_cpu = q4.resolve(CPU).unwrap();
        assert_eq!(on_cpu.frozen, Frozen::Packed(BlockFormat::Q4_0, DType::F16));
        assert_eq!(on_cpu.compute, DType::F32);
        let no_f16 = DeviceTypes {
            shader_f16: false,
            ..WGSL
        };
        let plain = q4.resolve(no_f16).unwrap();
        assert_eq!(plain.frozen, Frozen::Packed(BlockFormat::Q4_0, DType::F32));
        let half = types(BaseDtype::Q8_0, Precision::F16)
            .resolve(WGSL)
            .unwrap();
        assert_eq!(half.compute, DType::F16);
    }

    #[test]
    fn a_reduced_base_keeps_the_checkpoints_half_embeddings() {
        let q4 = types(BaseDtype::Q4_0, Precision::F32);
        let on_cpu = q4.resolve(CPU).unwrap();
        assert_eq!(on_cpu.embedding_dtype(Some(DType::F16)), DType::F16);
        assert_eq!(on_cpu.embedding_dtype(Some(DType::BF16)), DType::BF16);
        assert_eq!(on_cpu.embedding_dtype(None), DType::F32);
        // WGSL has f16 (with SHADER_F16) but no bf16: a bf16 embedding is widened.
        let on_wgsl = q4.resolve(WGSL).unwrap();
        assert_eq!(on_wgsl.embedding_dtype(Some(DType::F16)), DType::F16);
        assert_eq!(on_wgsl.embedding_dtype(Some(DType::BF16)), DType::F32);
        let no_f16 = DeviceTypes {
            shader_f16: false,
            ..WGSL
        };
        let plain = q4.resolve(no_f16).unwrap();
        assert_eq!(plain.embedding_dtype(Some(DType::F16)), DType::F32);
        // An f32 base (and a full fine-tune, which loads everything in f32) widens them.
        let f32 = types(BaseDtype::F32, Precision::F32).resolve(CPU).unwrap();
        assert_eq!(f32.embedding_dtype(Some(DType::F16)), DType::F32);
        assert_eq!(Resolved::F32.embedding_dtype(Some(DType::BF16)), DType::F32);
    }

    #[test]
    fn an_f16_base_under_bf16_is_refused() {
        let err = types(BaseDtype::F16, Precision::Bf16)
            .resolve(CPU)
            .unwrap_err()
            .to_string();
        assert!(err.contains("base_dtype"), "{err}");
    }

    #[test]
    fn names_parse_and_print_back() {
        for name in ["f32", "f16", "q8_0", "q4_0"] {
            assert_eq!(name.parse::<BaseDtype>().unwrap().to_string(), name);
        }
        let err = "int8".parse::<BaseDtype>().unwrap_err();
        assert!(err.contains("q4_0"), "{err}");
    }
}
