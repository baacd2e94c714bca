//! The UAL loss written with plain burn tensor ops and differentiated by burn's autodiff.
//! It is the executable specification the fused kernels are tested against.

use anyhow::Result;
use burn::tensor::{Int, Tensor, TensorData};

use super::{LossSum, RowLabels};

/// Per-row loss `[rows]`, zero on masked rows.
pub fn row_losses(logits: Tensor<2>, labels: &RowLabels) -> Result<Tensor<1>> {
    labels.check_against(logits.dims())?;
    let device = logits.device();
    let [rows, vocab] = logits.dims();
    let column =
        |values: Vec<f32>| Tensor::<2>::from_data(TensorData::new(values, [rows, 1]), &device);
    let eps = column(labels.smoothing().to_vec());
    let mask = column(
        labels
            .mask()
            .iter()
            .map(|&m| f32::from(u8::from(m)))
            .collect(),
    );
    let targets = Tensor::<2, Int>::from_data(
        TensorData::new(
            labels
                .targets()
                .iter()
                .map(|&t| t as i64)
                .collect::<Vec<_>>(),
            [rows, 1],
        ),
        &device,
    );

    let max = logits.clone().max_dim(1).detach();
    let lse = (logits.clone() - max.clone()).exp().sum_dim(1).log() + max;
    let z_target = logits.clone().gather(1, targets);
    let z_mean = logits.sum_dim(1).div_scalar(vocab as f32);
    let nll = lse.clone() - z_target;
    let smooth = lse - z_mean;
    let loss = (eps.clone().neg().add_scalar(1.0) * nll + eps * smooth) * mask;
    Ok(loss.reshape([rows]))
}

/// The reference counterpart of [`super::ual_loss_sum`].
pub fn ual_loss_sum(logits: Tensor<2>, labels: &RowLabels) -> Result<LossSum> {
    Ok(LossSum {
        sum: row_losses(logits, labels)?.sum(),
        count: labels.count(),
    })
}
