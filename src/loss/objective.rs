//! The training objective on one batch: hidden states, then only the response rows through the
//! LM head and the UAL loss.

use anyhow::Result;
use burn::tensor::{Int, Tensor, TensorData};

use super::Batch;
use super::head::HeadPlan;
use crate::loss::{LossSum, RowLabels, ual_linear_loss_sum, ual_loss_sum};
use crate::model::Llama;

/// A batch's summed loss, with the plain cross-entropy part of it for reporting.
pub struct ObjectiveLoss {
    /// The weighted UAL loss summed over the loss rows; differentiable.
    pub loss: LossSum,
    /// The same rows' weighted negative log-likelihood (ε = 0), detached: what the loss would
    /// be without smoothing, so that runs with different ε report comparable numbers.
    pub nll: Tensor<1>,
}

/// The summed UAL loss over the batch's response tokens, and their count.
///
/// Prompt and padding positions never reach the head: the response rows are gathered first.
pub fn response_loss(model: &Llama, batch: &Batch, head: HeadPlan) -> Result<ObjectiveLoss> {
    head_loss(model, model.hidden_states(batch.ids.clone()), batch, head)
}

/// The summed UAL loss of the response rows of final-norm `hidden: [batch, len, hidden]`.
pub fn head_loss(
    model: &Llama,
    hidden: Tensor<3>,
    batch: &Batch,
    head: HeadPlan,
) -> Result<ObjectiveLoss> {
    let [b, s, h] = hidden.dims();
    let labels = &batch.labels;
    if labels.rows() == 0 {
        let zero = Tensor::zeros([1], &hidden.device());
        return Ok(ObjectiveLoss {
            loss: LossSum {
                sum: zero.clone(),
                count: 0,
            },
            nll: zero,
        });
    }
    let response = hidden.reshape([b * s, h]).select(0, batch.rows.clone());
    let gap = smoothing_gap(model, &response, labels);
    let loss = match model.head_weight() {
        Some(weight) if head.fused => ual_linear_loss_sum(response, weight, labels, head.blocks)?,
        _ => unfused_loss(model, response, labels, head)?,
    };
    let nll = loss.sum.clone().detach() + gap;
    Ok(ObjectiveLoss { loss, nll })
}

/// Logits for `head.blocks.block_rows` rows at a time, then the fused loss on each block.
fn unfused_loss(
    model: &Llama,
    response: Tensor<2>,
    labels: &RowLabels,
    head: HeadPlan,
) -> Result<LossSum> {
    let n = labels.rows();
    let mut sum: Option<Tensor<1>> = None;
    let chunk = head.blocks.block_rows.max(1);
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let logits = model.logits(response.clone().narrow(0, start, len));
        let part = ual_loss_sum(logits, &labels.slice(start..start + len))?.sum;
        sum = Some(match sum {
            Some(total) => total + part,
            None => part,
        });
    }
    Ok(LossSum {
        sum: sum.expect("at least one chunk"),
        count: n,
    })
}

/// `Σ_r w_r·ε_r·(mean_k z_rk − z_{r,y_r})`: what turns the summed UAL loss into the summed NLL.
///
/// A row's UAL loss is `lse − (1 − ε)·z_y − ε·mean z`, so its NLL `lse − z_y` is the loss plus
/// `ε·(mean z − z_y)`. Both logits are linear in the hidden state: `mean z = h·mean_k W_k` and
/// `z_y = h·W_y`, an `[rows, H]` computation with no `[rows, V]` block, without gradients.
/// Nothing is computed when no row is smoothed.
fn smoothing_gap(model: &Llama, response: &Tensor<2>, labels: &RowLabels) -> Tensor<1> {
    let device = response.device();
    let coefficients: Vec<f32> = labels
        .weights()
        .iter()
        .zip(labels.smoothing())
        .map(|(w, e)| w * e)
        .collect();
    if coefficients.iter().all(|&c| c == 0.0) {
        return Tensor::zeros([1], &device);
    }
    let n = labels.rows();
    let response = response.clone().detach();
    let targets: Vec<i64> = labels.targets().iter().map(|&t| t as i64).collect();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [n]), &device);
    let c = Tensor::<2>::from_data(TensorData::new(coefficients, [n, 1]), &device);
    let (mean_logit, target_logit) = match model.head_mean_and_columns(targets.clone()) {
        Some((mean_column, target_rows)) => (
            response.clone().matmul(mean_column),
            (response * target_rows).sum_dim(1),
        ),
        None => {
            let logits = model.logits(response).detach();
            (
                logits.clone().mean_dim(1),
                logits.gather(1, targets.unsqueeze_dim(1)),
            )
        }
    };
    ((mean_logit - target_logit) * c).sum()
}
