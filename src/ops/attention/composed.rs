//! Attention in burn ops, for every backend: the reference the kernels are tested against, and
//! what runs where no kernel applies (bf16 on wgpu, say). It forms the `[len, len]` scores.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Scalar, TensorMetadata};
use burn::tensor::{FloatDType, Shape, TensorData};

use super::{lse_shape, sees};

/// softmax(q·kᵀ/√d + mask)·v and the rows' log-sum-exp (f32), keys and values repeated for
/// their query heads.
pub fn forward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    window: usize,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let group = group_of::<B>(&q, &k);
    let [k, v] = [k, v].map(|t| repeat_kv::<B>(t, group));
    let lse_shape = lse_shape(&q.shape());
    let scores = scores::<B>(q, k, window);
    let max = B::float_max_dim(scores.clone(), 3);
    let shifted = B::float_sub(scores, max.clone());
    let exp = B::float_exp(shifted);
    let sum = B::float_sum_dim(exp.clone(), 3);
    let p = B::float_div(exp, sum.clone());
    let lse = B::float_reshape(B::float_add(max, B::float_log(sum)), lse_shape);
    (B::float_matmul(p, v), B::float_cast(lse, FloatDType::F32))
}

/// The gradients of Σ grad·[`forward`] with respect to q, k and v, the probabilities recomputed
/// from q and k; the keys' and values' gradients summed over the query heads that share them.
pub fn backward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    grad: FloatTensor<B>,
    window: usize,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let group = group_of::<B>(&q, &k);
    let [k, v] = [k, v].map(|t| repeat_kv::<B>(t, group));
    let scale = scale_of(&q.shape());
    let p = B::softmax(scores::<B>(q.clone(), k.clone(), window), 3);
    let grad_v = B::float_matmul(B::float_swap_dims(p.clone(), 2, 3), grad.clone());
    let grad_p = B::float_matmul(grad, B::float_swap_dims(v, 2, 3));
    // The softmax's backward: p · (grad p − Σ p · grad p), times the scores' scale.
    let shift = B::float_sum_dim(B::float_mul(p.clone(), grad_p.clone()), 3);
    let grad_scores = B::float_mul(p, B::float_sub(grad_p, shift));
    let grad_scores = B::float_mul_scalar(grad_scores, Scalar::Float(scale));
    let grad_q = B::float_matmul(grad_scores.clone(), k);
    let grad_k = B::float_matmul(B::float_swap_dims(grad_scores, 2, 3), q);
    let [grad_k, grad_v] = [grad_k, grad_v].map(|t| sum_groups::<B>(t, group));
    (grad_q, grad_k, grad_v)
}

/// Query heads per key/value head.
fn group_of<B: Backend>(q: &FloatTensor<B>, k: &FloatTensor<B>) -> usize {
    q.shape()[1] / k.shape()[1]
}

/// `[b, kv, len, d]` → `[b, kv · group, len, d]`, each key/value head once per query head.
pub(crate) fn repeat_kv<B: Backend>(t: FloatTensor<B>, group: usize) -> FloatTensor<B> {
    if group == 1 {
        return t;
    }
    let [b, kv, len, d] = dims::<B>(&t);
    let t = B::float_reshape(t, Shape::new([b, kv, 1, len, d]));
    let t = B::float_expand(t, Shape::new([b, kv, group, len, d]));
    B::float_reshape(t, Shape::new([b, kv * group, len, d]))
}

/// The inverse of [`repeat_kv`] for gradients: each key/value head's sum over its query heads.
pub(crate) fn sum_groups<B: Backend>(t: FloatTensor<B>, group: usize) -> FloatTensor<B> {
    if group == 1 {
        return t;
    }
    let [b, heads, len, d] = dims::<B>(&t);
    let t = B::float_reshape(t, Shape::new([b, heads / group, group, len, d]));
    let t = B::float_sum_dim(t, 2);
    B::float_reshape(t, Shape::new([b, heads / group, len, d]))
}

fn dims<B: Backend>(t: &FloatTensor<B>) -> [usize; 4] {
    let s = t.shape();
    [s[0], s[1], s[2], s[3]]
}

/// q·kᵀ/√d with the mask added.
fn scores<B: Backend>(q: FloatTensor<B>, k: FloatTensor<B>, window: usize) -> FloatTensor<B> {
    let len = q.shape()[2];
    let scale = scale_of(&q.shape());
    let mask = B::float_from_data(additive_mask(len, window), &q.device());
    let mask = B::float_cast(mask, q.dtype().into());
    let scores = B::float_matmul(q, B::float_swap_dims(k, 2, 3));
    B::float_add(B::float_mul_scalar(scores, Scalar::Float(scale)), mask)
}

/// `[1, 1, len, len]`: 0 where a query sees a key, a large negative number elsewhere (not
/// −∞, so that nothing turns into NaN).
fn additive_mask(len: usize, window: usize) -> TensorData {
    let values = (0..len)
        .flat_map(|i| (0..len).map(move |j| if sees(i, j, window) { 0.0 } else { -1e30f32 }))
        .collect::<Vec<_>>();
    TensorData::new(values, [1, 1, len, len])
}

fn scale_of(shape: &Shape) -> f64 {
    (shape[3] as f64).powf(-0.5)
}
