//! The training objective on one batch: hidden states, then only the response rows through the
//! LM head, then the UAL loss, in row chunks that respect the device's binding limit.

use anyhow::Result;
use burn::tensor::Tensor;

use crate::data::batch::Batch;
use crate::loss::{LossSum, ual_loss_sum};
use crate::model::Llama;

/// The summed UAL loss over the batch's response tokens, and their count.
///
/// Prompt and padding positions never reach the head: the response rows are gathered first.
pub fn response_loss(model: &Llama, batch: &Batch, rows_per_chunk: usize) -> Result<LossSum> {
    let hidden = model.hidden_states(batch.ids.clone());
    let [b, s, h] = hidden.dims();
    let n = batch.labels.rows();
    let device = hidden.device();
    if n == 0 {
        return Ok(LossSum {
            sum: Tensor::zeros([1], &device),
            count: 0,
        });
    }
    let response = hidden.reshape([b * s, h]).select(0, batch.rows.clone());
    let mut sum: Option<Tensor<1>> = None;
    for start in (0..n).step_by(rows_per_chunk.max(1)) {
        let len = rows_per_chunk.min(n - start);
        let logits = model.logits(response.clone().narrow(0, start, len));
        let part = ual_loss_sum(logits, &batch.labels.slice(start..start + len))?.sum;
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
