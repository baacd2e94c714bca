//! The learning-rate schedule and global-norm gradient clipping.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

use super::config::{OptimConfig, Schedule};

/// Linear warm-up from 0 to `lr` over `warmup_steps`, then cosine decay to
/// `lr · min_lr_ratio` at the last step, or `lr` to the end.
pub fn learning_rate(
    config: &OptimConfig,
    warmup_steps: usize,
    step: usize,
    total_steps: usize,
) -> f64 {
    let warmup = warmup_steps.min(total_steps.saturating_sub(1));
    if step < warmup {
        return config.lr * (step + 1) as f64 / (warmup + 1) as f64;
    }
    if config.schedule == Schedule::Constant {
        return config.lr;
    }
    let decay_steps = (total_steps - warmup).max(1);
    let progress = (step - warmup) as f64 / decay_steps as f64;
    let min_lr = config.lr * config.min_lr_ratio;
    min_lr + 0.5 * (config.lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// The L2 norm of all gradients together, as torch's `clip_grad_norm_` computes it. Burn's own
/// clipping works per tensor, which is a different rule.
pub fn global_norm<M: Module>(model: &M, grads: &GradientsParams) -> f64 {
    struct SquaredNorms<'a> {
        grads: &'a GradientsParams,
        total: Option<Tensor<1>>,
    }
    impl ModuleVisitor for SquaredNorms<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let sq = g.square().sum();
                self.total = Some(match self.total.take() {
                    Some(t) => t + sq,
                    None => sq,
                });
            }
        }
    }
    let mut visitor = SquaredNorms { grads, total: None };
    model.visit(&mut visitor);
    visitor
        .total
        .map(|t| (t.into_scalar::<f32>() as f64).sqrt())
        .unwrap_or(0.0)
}

/// Clips the gradients to a global norm of `max_norm` (0 turns clipping off), as torch's
/// `clip_grad_norm_`, and returns their norm before clipping.
pub fn clip<M: Module>(model: &M, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    let norm = global_norm(model, grads);
    if max_norm > 0.0 && norm > max_norm {
        scale_grads(model, grads, max_norm / (norm + 1e-6));
    }
    norm
}

/// Scales every gradient by `factor`.
pub fn scale_grads<M: Module>(model: &M, grads: &mut GradientsParams, factor: f64) {
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads.register(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    model.visit(&mut Scale { grads, factor });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_the_floor() {
        let c = OptimConfig {
            lr: 1.0,
            warmup_steps: 4,
            min_lr_ratio: 0.1,
            ..Default::default()
        };
        assert!((learning_rate(&c, 4, 0, 20) - 0.2).abs() < 1e-12);
        assert!((learning_rate(&c, 4, 4, 20) - 1.0).abs() < 1e-12);
        let last = learning_rate(&c, 4, 19, 20);
        assert!(last > 0.1 && last < 0.12, "{last}");
        let lrs: Vec<f64> = (4..20).map(|s| learning_rate(&c, 4, s, 20)).collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0]), "monotone decay");
    }

    #[test]
    fn constant_after_warmup() {
        let c = OptimConfig {
            lr: 1.0,
            schedule: Schedule::Constant,
            ..Default::default()
        };
        assert!((learning_rate(&c, 2, 0, 20) - 1.0 / 3.0).abs() < 1e-12);
        assert!((0..20).skip(2).all(|s| learning_rate(&c, 2, s, 20) == 1.0));
    }
}
