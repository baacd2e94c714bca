//! Parameter ids that make optimizer state follow a weight's name.

use burn::module::{Param, ParamId};
use burn::tensor::Tensor;

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
