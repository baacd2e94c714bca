//! A linear projection of the decoder, frozen or trained, that may carry a LoRA adapter, and
//! the parameter ids that make optimizer state follow a weight's name.

use burn::module::{Module, Param, ParamId};
use burn::nn::{Dropout, Linear};
use burn::tensor::{DType, Tensor};

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

/// A projection that may carry a LoRA adapter.
#[derive(Module, Debug)]
pub struct LoraLinear {
    /// The frozen (or fully trained) projection, `[in, out]`.
    pub base: Linear,
    /// The adapter, when LoRA is attached.
    pub lora: Option<LoraAdapter>,
}

impl LoraLinear {
    /// A projection without an adapter.
    pub fn new(base: Linear) -> Self {
        Self { base, lora: None }
    }

    /// `x·W (+ b) + (α/r)·(dropout(x)·A)·B`. The adapter's factors are f32 in every
    /// precision, so a half-precision input is widened for the low-rank branch and its
    /// product narrowed back: the factors' gradients are formed in f32.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let Some(lora) = &self.lora else {
            return self.base_forward(x);
        };
        let dtype = x.dtype();
        let wide = match dtype {
            DType::F32 => x.clone(),
            _ => x.clone().cast(DType::F32),
        };
        let low = lora.dropout.forward(wide).matmul(lora.a.val().unsqueeze());
        let low = low.matmul(lora.b.val().unsqueeze()).mul_scalar(lora.scale);
        let low = match dtype {
            DType::F32 => low,
            _ => low.cast(dtype),
        };
        self.base_forward(x) + low
    }

    /// The frozen projection. When its weights are stored in half precision
    /// ([`super::lora::store_frozen_in`]) the product runs in that precision and comes back in the input's:
    /// autodiff then keeps the half-precision input, not an f32 copy of the weight.
    fn base_forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let stored = self.base.weight.val().dtype();
        let dtype = x.dtype();
        if stored == dtype {
            return self.base.forward(x);
        }
        self.base.forward(x.cast(stored)).cast(dtype)
    }

    /// `[in, out]` of the frozen projection.
    pub fn dims(&self) -> [usize; 2] {
        self.base.weight.dims()
    }
}

/// Wraps a tensor as a parameter whose id is derived from its Hugging Face `name`.
///
/// Optimizer state is keyed by parameter id. Ids that follow from names, rather than from a
/// process-wide counter, let a restarted run hand its saved optimizer state back to the same
/// parameters, which is what makes `--resume` exact.
pub(crate) fn param<const D: usize>(name: &str, t: Tensor<D>) -> Param<Tensor<D>> {
    let mut param = Param::from_tensor(t);
    param.id = ParamId::from(stable_id(name));
    param
}

/// FNV-1a: a fixed hash, unlike std's randomly keyed one.
pub(crate) fn stable_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
