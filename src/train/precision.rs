//! Half-precision training: the element type of the frozen weights and the activations, and the
//! dynamic loss scale that keeps f16's small gradients from flushing to zero.
//!
//! What stays f32 in every precision: the LoRA factors, their gradients and AdamW's moments
//! (f16 steps of size lr·g would round away), RMSNorm's statistics (a sum of squares over the
//! hidden width overflows f16), the embeddings, the LM head and the loss, which accumulates
//! in f32 over the vocabulary. The decoder's projections (almost all of a model's weights and
//! FLOPs), attention and the residual stream run in the half type.

use anyhow::{Result, bail};
use burn::tensor::DType;
use serde::{Deserialize, Serialize};

/// The element type a LoRA run computes in (`precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Precision {
    /// Full precision everywhere.
    #[default]
    #[serde(rename = "f32")]
    F32,
    /// IEEE half: 11 bits of mantissa, range ±65504, so the loss is scaled ([`LossScale`]).
    #[serde(rename = "f16")]
    F16,
    /// bfloat16: f32's range with 8 bits of mantissa; needs no loss scale.
    #[serde(rename = "bf16")]
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!(
                "precision = \"{other}\": expected \"f32\", \"f16\" or \"bf16\""
            )),
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

/// What a device can compute in, for [`Precision::dtype`].
#[derive(Debug, Clone, Copy)]
pub struct DeviceTypes {
    /// A wgpu adapter (else the CPU).
    pub is_wgpu: bool,
    /// The adapter has SHADER_F16.
    pub shader_f16: bool,
    /// Its compiler does arithmetic in bf16 (MSL only; WGSL has no bf16, and SPIR-V only
    /// converts and stores it).
    pub bf16_arithmetic: bool,
}

impl Precision {
    /// The tensor type, checked against the device: one line naming what is missing.
    pub fn dtype(self, device: DeviceTypes) -> Result<DType> {
        match self {
            Self::F32 => Ok(DType::F32),
            Self::F16 if device.is_wgpu && !device.shader_f16 => {
                bail!("precision = \"f16\": this adapter lacks SHADER_F16; use \"f32\"")
            }
            Self::F16 => Ok(DType::F16),
            Self::Bf16 if device.is_wgpu && !device.bf16_arithmetic => bail!(
                "precision = \"bf16\": this adapter's shader compiler has no bf16 arithmetic (WGSL has none, SPIR-V only stores it); use \"f16\" or --device cpu"
            ),
            Self::Bf16 => Ok(DType::BF16),
        }
    }

    /// Whether the run needs a loss scale: f16 only.
    pub fn scales_loss(self) -> bool {
        self == Self::F16
    }
}

/// A dynamic loss scale, as PyTorch's `GradScaler` keeps one: the loss is multiplied by
/// `scale` before the backward pass and the gradients divided by it after. A step whose
/// gradients overflow is skipped and the scale halved; after `interval` clean steps in a row
/// it doubles, so it hovers just below the largest scale f16 takes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    /// The factor on the loss.
    pub scale: f64,
    /// Clean steps since the scale last changed.
    pub clean_steps: usize,
}

impl LossScale {
    /// 2¹⁶, GradScaler's initial scale.
    pub const INITIAL: f64 = 65_536.0;
    /// Clean steps before the scale doubles (GradScaler's growth interval).
    pub const INTERVAL: usize = 2000;
    /// Below this the overflow is not in the gradients but in the forward pass, and no scale
    /// helps.
    pub const FLOOR: f64 = 1.0;

    /// The scale a run starts with.
    pub fn new() -> Self {
        Self {
            scale: Self::INITIAL,
            clean_steps: 0,
        }
    }

    /// Updates the scale after a step whose unscaled gradients were `finite` or not, and says
    /// whether the step may be applied.
    pub fn update(&mut self, finite: bool, interval: usize) -> bool {
        if !finite {
            self.scale /= 2.0;
            self.clean_steps = 0;
            return false;
        }
        self.clean_steps += 1;
        if self.clean_steps >= interval {
            self.scale *= 2.0;
            self.clean_steps = 0;
        }
        true
    }

    /// Whether the scale has fallen so far that the run has diverged.
    pub fn exhausted(&self) -> bool {
        self.scale < Self::FLOOR
    }
}

impl Default for LossScale {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overflow_halves_the_scale_and_skips_the_step() {
        let mut s = LossScale::new();
        assert!(s.update(true, 3));
        assert!(!s.update(false, 3), "an overflowing step is skipped");
        assert_eq!(s.scale, LossScale::INITIAL / 2.0);
        assert_eq!(s.clean_steps, 0, "an overflow restarts the count");
    }

    #[test]
    fn the_scale_doubles_after_interval_clean_steps() {
        let mut s = LossScale::new();
        assert!(s.update(true, 3) && s.update(true, 3));
        assert_eq!(s.scale, LossScale::INITIAL);
        assert!(s.update(true, 3));
        assert_eq!(s.scale, 2.0 * LossScale::INITIAL);
        assert_eq!(s.clean_steps, 0);
    }

    #[test]
    fn seventeen_overflows_in_a_row_exhaust_the_scale() {
        let mut s = LossScale::new();
        for _ in 0..16 {
            s.update(false, 3);
            assert!(!s.exhausted());
        }
        s.update(false, 3);
        assert!(s.exhausted(), "2^16 / 2^17 < 1");
    }

    #[test]
    fn each_precision_asks_for_what_the_device_has() {
        let wgsl = DeviceTypes {
            is_wgpu: true,
            shader_f16: true,
            bf16_arithmetic: false,
        };
        let cpu = DeviceTypes {
            is_wgpu: false,
            shader_f16: false,
            bf16_arithmetic: false,
        };
        assert_eq!(Precision::F16.dtype(wgsl).unwrap(), DType::F16);
        assert_eq!(Precision::Bf16.dtype(cpu).unwrap(), DType::BF16);
        assert_eq!(Precision::F16.dtype(cpu).unwrap(), DType::F16);
        let err = Precision::Bf16.dtype(wgsl).unwrap_err().to_string();
        assert!(err.contains("no bf16 arithmetic"), "{err}");
        let no_f16 = DeviceTypes {
            shader_f16: false,
            ..wgsl
        };
        let err = Precision::F16.dtype(no_f16).unwrap_err().to_string();
        assert!(err.contains("SHADER_F16"), "{err}");
        assert!(!Precision::Bf16.scales_loss() && Precision::F16.scales_loss());
    }
}
