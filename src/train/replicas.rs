//! Data parallelism: every rank holds the whole model and takes a slice of each step's batch;
//! their gradients are summed with one all-reduce, so every rank takes the same optimizer step.
//!
//! The gradients of the trainable parameters travel as one flat f32 buffer, filled on the
//! device (one read-back) and read back into tensors shaped as before (one upload). Because
//! each rank's loss is already divided by the *global* step's divisor ([`StepTotals`]), the sum
//! is exactly the gradient one device would compute for the whole batch.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Tensor, TensorData};

use super::StepGradients;
use crate::cluster::Cluster;
use crate::data::batch::{Reduction, Sample};
use crate::model::Llama;

/// What the step's divisor and its logged means need from every rank's samples, summed over
/// the ranks before any gradient is computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepTotals {
    /// The loss divisor: loss tokens (`reduction = "tokens"`) or samples (`"samples"`).
    pub divisor: f64,
    /// Response tokens, for the ε mean.
    pub response_tokens: f64,
    /// ε × response tokens, summed.
    pub weighted_eps: f64,
}

impl StepTotals {
    /// This rank's share of the totals.
    pub fn local<'a>(samples: impl Iterator<Item = &'a Sample>, reduction: Reduction) -> Self {
        let mut totals = Self {
            divisor: 0.0,
            response_tokens: 0.0,
            weighted_eps: 0.0,
        };
        for s in samples {
            let tokens = s.response_tokens() as f64;
            totals.divisor += s.share(reduction);
            totals.response_tokens += tokens;
            totals.weighted_eps += s.epsilon * tokens;
        }
        totals
    }

    /// The totals over every rank.
    pub fn global(self, cluster: &Cluster) -> Self {
        let mut v = [self.divisor, self.response_tokens, self.weighted_eps];
        cluster.sum_f64(&mut v, "the step's token counts");
        Self {
            divisor: v[0],
            response_tokens: v[1],
            weighted_eps: v[2],
        }
    }

    /// The response-token-weighted mean ε.
    pub fn mean_eps(&self) -> f64 {
        self.weighted_eps / self.response_tokens.max(1.0)
    }
}

/// Sums the step's gradients, loss, NLL and token count over the ranks in place, in one
/// all-reduce: the step's one exchange after its backward pass, as [`StepTotals::global`] is
/// its one before.
pub fn sum_step(model: &Llama, step: &mut StepGradients, cluster: &Cluster) {
    if !cluster.is_parallel() {
        return;
    }
    let mut figures = [step.loss as f32, step.nll as f32, step.tokens as f32];
    sum_gradients(model, &mut step.grads, &mut figures, cluster);
    (step.loss, step.nll) = (figures[0] as f64, figures[1] as f64);
    step.tokens = figures[2].round() as usize;
}

/// Sums `grads` over the ranks in place, with `figures` (the step's loss and counts) riding
/// in the same all-reduce. A rank whose slice of the batch was empty contributes zeros.
fn sum_gradients(
    model: &Llama,
    grads: &mut GradientsParams,
    figures: &mut [f32],
    cluster: &Cluster,
) {
    if !cluster.is_parallel() {
        return;
    }
    let (started, waited) = (std::time::Instant::now(), cluster.waited());
    let Some(flat) = flatten(model, grads) else {
        cluster.sum_f32(figures, "the gradient all-reduce");
        return;
    };
    let (numel, device) = (flat.shape().num_elements(), flat.device());
    let mut values: Vec<f32> = flat
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("converted to f32");
    values.extend_from_slice(figures);
    cluster.sum_f32(&mut values, "the gradient all-reduce");
    let n = values.len();
    figures.copy_from_slice(&values[numel..]);
    values.truncate(numel);
    let flat = Tensor::<1>::from_data(TensorData::new(values, [numel]), &device);
    model.visit(&mut Unflatten {
        grads,
        flat,
        offset: 0,
    });
    let bytes = (n * std::mem::size_of::<f32>()) as u64;
    let waiting = cluster.waited() - waited;
    cluster.record_exchange(bytes, started.elapsed().as_secs_f64(), waiting);
}

/// The gradients of the trainable parameters, in visiting order (the same on every rank),
/// concatenated into one f32 vector on the device; zeros where this rank has none. `None` for
/// a model with nothing to train.
fn flatten(model: &Llama, grads: &GradientsParams) -> Option<Tensor<1>> {
    struct Collect<'a> {
        grads: &'a GradientsParams,
        parts: Vec<Tensor<1>>,
    }
    impl ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let value = param.val();
            if !value.is_require_grad() {
                return;
            }
            let numel = value.shape().num_elements();
            self.parts.push(match self.grads.get::<D>(param.id) {
                Some(g) => g.cast(DType::F32).reshape([numel]),
                None => Tensor::zeros([numel], &value.inner().device()),
            });
        }
    }
    let mut collect = Collect {
        grads,
        parts: Vec::new(),
    };
    model.visit(&mut collect);
    (!collect.parts.is_empty()).then(|| Tensor::cat(collect.parts, 0))
}

/// Cuts the summed flat vector back into gradients shaped (and typed) as their parameters.
struct Unflatten<'a> {
    grads: &'a mut GradientsParams,
    flat: Tensor<1>,
    offset: usize,
}

impl ModuleVisitor for Unflatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        if !value.is_require_grad() {
            return;
        }
        let dims: [usize; D] = value.dims();
        let numel = value.shape().num_elements();
        let g = self
            .flat
            .clone()
            .narrow(0, self.offset, numel)
            .reshape(dims);
        self.offset += numel;
        self.grads.register::<D>(param.id, g.cast(value.dtype()));
    }
}
