//! Gradient checkpointing of decoder layers.
//!
//! The forward pass runs without a graph and keeps only each decoder layer's input. The
//! backward pass then works down from the loss one segment at a time: first the final norm,
//! the head and the loss on the last layer's output; then each layer, recomputed with a graph
//! from its saved input and differentiated against the gradient that came down from the segment
//! above. At most one layer's activations are alive at once, for the price of one more forward
//! pass: the scheme of Hugging Face's `gradient_checkpointing_enable()`.
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
        let input = input.autodiff().require_grad();
        let output = layer.forward(input.clone(), &context);
        grad = backward_segment(model, (output * grad).sum(), &input, accumulator);
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
