//! LoRA: a frozen projection plus a trainable low-rank update, x·W + (α/r)·(dropout(x)·A)·B.
//!
//! The dense update W + s·A·B is never formed, and W gets no gradient. The frozen W is dense
//! (f32, f16 or bf16) or packed in llama.cpp's Q8_0/Q4_0 blocks (QLoRA). Factors are kept in
//! burn's `[in, r]` / `[r, out]` layout; `peft` reads and writes them in PEFT's.

use anyhow::{Result, bail};
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::tensor::{DType, Device, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::llama::Llama;
use super::names::PROJECTIONS;
use super::param::{param, stable_id};
use crate::ops::quant::{self, PackedWeight};

/// The projections LoRA may target: PEFT's `target_modules` names, the last part of each of
/// [`PROJECTIONS`].
pub fn targets() -> Vec<&'static str> {
    PROJECTIONS.iter().map(|p| p.module()).collect()
}

/// LoRA hyper-parameters, named as in PEFT's `LoraConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank of the update.
    pub r: usize,
    /// Scale numerator: the update is multiplied by α / r.
    pub alpha: f64,
    /// Dropout on the adapter's input while training.
    pub dropout: f64,
    /// PEFT's names of the projections that get adapters.
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: targets().into_iter().map(String::from).collect(),
        }
    }
}

impl LoraConfig {
    /// Refuses a rank of 0, dropout outside [0, 1) and unknown targets.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            bail!("lora.r must be positive");
        }
        // α = 0 makes the update vanish (training moves nothing); a negative or non-finite α
        // is no scale at all.
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            bail!(
                "lora.alpha = {} must be a positive number (PEFT's default is 2·r = {})",
                self.alpha,
                2 * self.r
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("lora.dropout = {} is outside [0, 1)", self.dropout);
        }
        if self.target_modules.is_empty() {
            bail!(
                "lora.target_modules is empty; choose from {}",
                targets().join(", ")
            );
        }
        for t in &self.target_modules {
            if !targets().contains(&t.as_str()) {
                bail!(
                    "lora.target_modules: unknown module {t:?}; choose from {}",
                    targets().join(", ")
                );
            }
        }
        Ok(())
    }

    /// Refuses a rank above what a targeted projection of `model` can hold: min(in, out).
    pub fn validate_for(&self, model: &super::ModelConfig) -> Result<()> {
        for projection in PROJECTIONS {
            let (target, (d_in, d_out, _)) = (projection.module(), projection.shape(model));
            let bound = d_in.min(d_out);
            if self.target_modules.iter().any(|t| t == target) && self.r > bound {
                bail!(
                    "lora.r = {} exceeds {target}'s rank bound min(in, out) = {bound}; choose lora.r <= {bound}",
                    self.r
                );
            }
        }
        Ok(())
    }

    /// α / r.
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }
}

/// Freezes the base model and attaches fresh adapters with PEFT's initialisation: A
/// Kaiming-uniform (bound 1/√in), B zero, so training starts from the base model exactly.
///
/// A is drawn on the host from `seed` and the module's name, so a run starts from the same
/// adapters on every device and whatever else the process is doing with the device's RNG.
pub fn attach(model: Llama, config: &LoraConfig, seed: u64, device: &Device) -> Llama {
    let mut model = model.no_grad();
    for_each_target(&mut model, config, |name, proj| {
        let [d_in, d_out] = proj.dims();
        let bound = 1.0 / (d_in as f32).sqrt();
        let mut rng = StdRng::seed_from_u64(seed ^ stable_id(name));
        let values: Vec<f32> = (0..d_in * config.r)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let a = Tensor::from_data(TensorData::new(values, [d_in, config.r]), device);
        let b = Tensor::zeros([config.r, d_out], device);
        proj.lora = Some(adapter(name, a, b, config));
    });
    model
}

pub(super) fn adapter(name: &str, a: Tensor<2>, b: Tensor<2>, config: &LoraConfig) -> LoraAdapter {
    LoraAdapter {
        a: param(&format!("{name}.lora_A.weight"), a),
        b: param(&format!("{name}.lora_B.weight"), b),
        dropout: DropoutConfig::new(config.dropout).init(),
        scale: config.scale(),
    }
}

/// Calls `f` on every targeted projection, with its PEFT module path.
fn for_each_target(
    model: &mut Llama,
    config: &LoraConfig,
    mut f: impl FnMut(&str, &mut LoraLinear),
) {
    for_each_named(model, |name, proj| {
        if config
            .target_modules
            .iter()
            .any(|t| name.ends_with(t.as_str()))
        {
            f(name, proj);
        }
    });
}

/// Every projection with its Hugging Face path, e.g. `model.layers.0.self_attn.q_proj`.
pub fn for_each_named(model: &mut Llama, mut f: impl FnMut(&str, &mut LoraLinear)) {
    for (name, proj) in model.projections_mut() {
        f(&name, proj);
    }
}

/// One input of several projections (q, k and v; gate and up) and, when one of them carries an
/// adapter, its f32 copy for the adapters' branch, made once: each adapter's product keeps its
/// input for the backward, and three copies of a half-precision input would be three f32
/// tensors of `[len, hidden]` (64 MiB more at 7B and 2048 tokens).
pub struct SharedInput<const D: usize> {
    x: Tensor<D>,
    wide: Option<Tensor<D>>,
}

impl<const D: usize> SharedInput<D> {
    /// `x` as `readers` will read it.
    pub fn new(x: Tensor<D>, readers: &[&LoraLinear]) -> Self {
        let adapted = readers.iter().any(|p| p.lora.is_some());
        let wide = match x.dtype() {
            _ if !adapted => None,
            DType::F32 => Some(x.clone()),
            _ => Some(x.clone().cast(DType::F32)),
        };
        Self { x, wide }
    }
}

/// The low-rank update of one projection.
#[derive(Module, Debug)]
pub struct LoraAdapter {
    /// `[in, r]`, PEFT's `lora_A` transposed.
    pub a: Param<Tensor<2>>,
    /// `[r, out]`, PEFT's `lora_B` transposed.
    pub b: Param<Tensor<2>>,
    /// Dropout on the adapter's input while training.
    pub dropout: Dropout,
    /// α / r.
    #[module(skip)]
    pub scale: f64,
}

/// The weight of a projection.
// One per projection, so the size of the packed variant's handles costs nothing worth a Box
// (which burn's Module derive does not see through).
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Weight {
    /// `[in, out]`: trained by a full fine-tune, or frozen in f32, f16 or bf16.
    Dense(Param<Tensor<2>>),
    /// `[out, in]` in Q8_0 or Q4_0 blocks along `in`: frozen, a LoRA base.
    Packed(PackedWeight),
}

/// A projection that may carry a LoRA adapter.
#[derive(Module, Debug)]
pub struct LoraLinear {
    /// The frozen (or fully trained) weight.
    pub weight: Weight,
    /// The bias (Qwen2's q/k/v), in the dense weight's type or the compute type.
    pub bias: Option<Param<Tensor<1>>>,
    /// The adapter, when LoRA is attached.
    pub lora: Option<LoraAdapter>,
}

impl From<Linear> for LoraLinear {
    /// A dense projection without an adapter.
    fn from(linear: Linear) -> Self {
        Self {
            weight: Weight::Dense(linear.weight),
            bias: linear.bias,
            lora: None,
        }
    }
}

impl LoraLinear {
    /// `x·W (+ b) + (α/r)·(dropout(x)·A)·B`. The adapter's factors are f32 in every
    /// precision, so a half-precision input is widened for the low-rank branch and its
    /// product narrowed back: the factors' gradients are formed in f32.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.forward_shared(&SharedInput::new(x, &[self]))
    }

    /// [`Self::forward`] of an input that other projections read too.
    pub fn forward_shared<const D: usize>(&self, input: &SharedInput<D>) -> Tensor<D> {
        let x = input.x.clone();
        let Some(lora) = &self.lora else {
            return self.base_forward(x);
        };
        let wide = input
            .wide
            .clone()
            .expect("a shared input made for this projection");
        let dtype = x.dtype();
        let low = lora.dropout.forward(wide).matmul(lora.a.val().unsqueeze());
        let low = low.matmul(lora.b.val().unsqueeze()).mul_scalar(lora.scale);
        let low = match dtype {
            DType::F32 => low,
            _ => low.cast(dtype),
        };
        self.base_forward(x) + low
    }

    /// The frozen projection, its product in the stored type and returned in the input's: a
    /// dense half-precision weight multiplies a half-precision input (autodiff then keeps
    /// that, not an f32 copy of the weight); a packed one is dequantized into the input's type
    /// for the product alone.
    fn base_forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let (y, stored) = match &self.weight {
            Weight::Dense(w) => {
                let stored = w.val().dtype();
                let x = if stored == dtype { x } else { x.cast(stored) };
                (x.matmul(w.val().unsqueeze()), stored)
            }
            Weight::Packed(w) => (quant::linear(x, w), dtype),
        };
        // The bias is in the dense weight's type already; only a packed base's (f32) may need
        // narrowing to the compute type.
        let y = match self.bias.as_ref().map(|b| b.val()) {
            Some(b) if b.dtype() == stored => y + b.unsqueeze(),
            Some(b) => y + b.cast(stored).unsqueeze(),
            None => y,
        };
        if stored == dtype { y } else { y.cast(dtype) }
    }

    /// `[in, out]` of the frozen projection.
    pub fn dims(&self) -> [usize; 2] {
        match &self.weight {
            Weight::Dense(w) => w.dims(),
            Weight::Packed(w) => {
                let [out, d_in] = w.dims();
                [d_in, out]
            }
        }
    }

    /// The dense weight `[in, out]` in f32: the stored one, or the packed blocks dequantized.
    pub fn dense_weight(&self) -> Tensor<2> {
        match &self.weight {
            Weight::Dense(w) => w.val().cast(DType::F32),
            Weight::Packed(w) => quant::dequantize(w).transpose(),
        }
    }

    /// Stores a dense frozen weight (and its bias) in `dtype`; a packed one stays as it is.
    pub fn store_frozen_in(&mut self, dtype: DType) {
        fn frozen<const D: usize>(p: &Param<Tensor<D>>, dtype: DType) -> Param<Tensor<D>> {
            let mut converted =
                Param::from_tensor(p.val().cast(dtype).detach()).set_require_grad(false);
            converted.id = p.id;
            converted
        }
        if let Weight::Dense(w) = &self.weight {
            if w.val().dtype() == dtype {
                return;
            }
            self.weight = Weight::Dense(frozen(w, dtype));
            self.bias = self.bias.as_ref().map(|b| frozen(b, dtype));
        }
    }
}
