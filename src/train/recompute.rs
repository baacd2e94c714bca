//! Gradient checkpointing of decoder layers.
//!
//! The forward pass runs without a graph and keeps only each decoder layer's input. The
//! backward pass then works down from the loss one segment at a time: first the final norm,
//! the head and the loss on the last layer's output; then each layer, recomputed with a graph
//! from its saved input and differentiated against the gradient that came down from the segment
//! above. At most one layer's activations are alive at once, for the price of one more forward
//! pass: the scheme of Hugging Face's `gradient_checkpointing_enable()`. Within a layer, the
//! feed-forward half (position-wise, and the widest) is differentiated a block of positions at
//! a time, so a long sequence never holds its MLP's activations whole.
//!
//! Each segment is its own graph and its own backward; the parameters are the same leaves in
//! all of them (burn allows a leaf in many graphs), so their gradients simply add up.

use anyhow::Result;
use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::Tensor;

use crate::loss::Batch;
use crate::loss::HeadPlan;
use crate::loss::objective::head_loss;
use crate::model::Llama;
use crate::model::llama::{DecoderLayer, LayerContext};

/// Adds to `accumulator` the gradients of this batch's summed response loss divided by `scale`,
/// recomputing each decoder layer in the backward pass, and returns that scaled loss and its
/// NLL part.
///
/// The gradients equal those of `response_loss(..).sum / scale` up to rounding. The forward pass
/// runs the layers without dropout, so the model must have none (`TrainConfig::validate`).
pub fn accumulate_gradients(
    model: &Llama,
    batch: &Batch,
    head: HeadPlan,
    scale: f64,
    accumulator: &mut GradientsAccumulator<Llama>,
) -> Result<(f32, f32)> {
    if batch.labels.rows() == 0 {
        return Ok((0.0, 0.0));
    }
    let (inputs, top) = layer_inputs(model, batch);

    let top = top.autodiff().require_grad();
    let hidden = model.final_norm(top.clone());
    let objective = head_loss(model, hidden, batch, head)?;
    let nll = objective.nll.into_scalar::<f32>() / scale as f32;
    let loss = objective.loss.sum.div_scalar(scale);
    let value = loss.clone().into_scalar::<f32>();
    let mut grad = backward_segment(model, loss, &top, accumulator);

    let [_, len] = batch.ids.dims();
    let context = model.layer_context(len, &batch.ids.device());
    for (layer, input) in model.layers.iter().zip(inputs).rev() {
        grad = backward_layer(model, layer, input, grad, &context, accumulator);
    }

    if model.embed_tokens.weight.val().is_require_grad() {
        let embedded = model.embed_tokens.forward(batch.ids.clone());
        let grads = (embedded * grad).sum().backward();
        accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
    }
    Ok((value, nll))
}

/// Each decoder layer's input and the last layer's output, computed without a graph.
fn layer_inputs(model: &Llama, batch: &Batch) -> (Vec<Tensor<3>>, Tensor<3>) {
    let frozen = model.valid();
    let ids = batch.ids.clone().inner();
    let [_, len] = ids.dims();
    let context = frozen.layer_context(len, &ids.device());
    let mut inputs = Vec::with_capacity(frozen.layers.len());
    let top = frozen.decoder_stack(ids, |_, layer, x| {
        inputs.push(x.clone());
        layer.forward(x, &context)
    });
    (inputs, top)
}

/// One layer recomputed from its `input` and differentiated against `grad`, the gradient of its
/// output; returns the gradient of its input. The attention half keeps its graph while the
/// feed-forward half is differentiated a block of positions at a time.
fn backward_layer(
    model: &Llama,
    layer: &DecoderLayer,
    input: Tensor<3>,
    grad: Tensor<3>,
    context: &LayerContext,
    accumulator: &mut GradientsAccumulator<Llama>,
) -> Tensor<3> {
    let input = input.autodiff().require_grad();
    let h = layer.attention_residual(input.clone(), context);
    let grad_h = feed_forward_grad(model, layer, h.clone().detach(), grad, accumulator, BLOCK);
    backward_segment(model, (h * grad_h).sum(), &input, accumulator)
}

/// The gradient of the feed-forward half's input `h`, given its output's `grad`, formed a
/// block of positions at a time. The half acts on each position alone, so the blocks' input
/// gradients are exactly the whole one's and its parameters' gradients add up over the blocks;
/// but only one block's activations (the MLP's are the widest of
/// the layer, `intermediate_size` values a position in five tensors) are alive at once. A block
/// holds about `values` intermediate values a tensor, so short sequences take one.
fn feed_forward_grad(
    model: &Llama,
    layer: &DecoderLayer,
    h: Tensor<3>,
    grad: Tensor<3>,
    accumulator: &mut GradientsAccumulator<Llama>,
    values: usize,
) -> Tensor<3> {
    let [batch, len, _] = h.dims();
    let per_position = batch * model.config.intermediate_size;
    let block = (values / per_position.max(1)).clamp(1, len.max(1));
    let grads = (0..len).step_by(block).map(|start| {
        let n = block.min(len - start);
        let h = h.clone().narrow(1, start, n).require_grad();
        let output = layer.feed_forward(h.clone());
        let seed = grad.clone().narrow(1, start, n);
        backward_segment(model, (output * seed).sum(), &h, accumulator)
    });
    Tensor::cat(grads.collect(), 1)
}

/// Intermediate values of one feed-forward block: 16 MiB a tensor in f32, a sixth of a 7B
/// layer's MLP at 2048 tokens.
const BLOCK: usize = 1 << 22;

/// Runs one segment's backward, keeps its parameter gradients, and returns the gradient with
/// respect to the segment's `input` (without a graph), which seeds the segment below.
fn backward_segment(
    model: &Llama,
    objective: Tensor<1>,
    input: &Tensor<3>,
    accumulator: &mut GradientsAccumulator<Llama>,
) -> Tensor<3> {
    let mut grads = objective.backward();
    let grad = input
        .grad_remove(&mut grads)
        .expect("the segment's input requires a gradient");
    accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
    grad
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::decode::random_model;
    use crate::bench::step::Preset;
    use crate::model::lora::{self, LoraConfig};
    use crate::model::precision::Resolved;
    use burn::tensor::{Device, Distribution};

    /// The feed-forward half differentiated 3 positions at a time (the last block short) gives
    /// the whole sequence's gradients, of its input and of every LoRA factor, up to the order
    /// of the factors' sums over blocks: 1e-5 of each tensor's largest entry.
    #[test]
    fn feed_forward_blocks_give_the_whole_gradient() {
        let device = Device::flex().autodiff();
        let shape = Preset::Tiny.shape();
        let (model, _) = random_model(&shape, &device, Resolved::F32).unwrap();
        let mut model = lora::attach(model, &LoraConfig::default(), 0, &device);
        // B starts at zero, so A would have no gradient to compare.
        for (_, proj) in model.projections_mut() {
            let lora = proj.lora.as_mut().expect("LoRA on every projection");
            let normal = Distribution::Normal(0.0, 0.1);
            lora.b = lora.b.clone().map(|b| b.random_like(normal).require_grad());
        }
        let normal = Distribution::Normal(0.0, 1.0);
        let h = Tensor::<3>::random([2, 10, shape.hidden_size], normal, &device);
        let grad = Tensor::<3>::random([2, 10, shape.hidden_size], normal, &device);
        let gradients = |values: usize| {
            let mut accumulator = GradientsAccumulator::new();
            let layer = &model.layers[0];
            let g = feed_forward_grad(
                &model,
                layer,
                h.clone(),
                grad.clone(),
                &mut accumulator,
                values,
            );
            let params = accumulator.grads();
            let mut all = vec![g.into_data().try_to_vec::<f32>().unwrap()];
            let mlp = &layer.mlp;
            for proj in [&mlp.gate_proj, &mlp.up_proj, &mlp.down_proj] {
                let lora = proj.lora.as_ref().expect("LoRA");
                for factor in [&lora.a, &lora.b] {
                    let g = params.get::<2>(factor.id).expect("a factor's gradient");
                    all.push(g.into_data().try_to_vec::<f32>().unwrap());
                }
            }
            all
        };
        let whole = gradients(usize::MAX);
        let blocks = gradients(3 * 2 * shape.intermediate_size);
        for (ours, theirs) in blocks.iter().zip(&whole) {
            assert_eq!(ours.len(), theirs.len());
            let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let gap = ours
                .iter()
                .zip(theirs)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(scale > 0.0 && gap <= 1e-5 * scale, "gap {gap} of {scale}");
        }
    }
}
