//! The fused loss under autodiff: hand-written backwards that keep only the logits handle and
//! the `[rows, 2]` statistics (never a softmax), and, for the fused head, the gradients the
//! forward pass already formed.

use burn::backend::Backend;
use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::tensor::Shape;

use super::backend::{HeadBlocks, UalLossBackend};

impl<B: UalLossBackend, C: CheckpointStrategy> UalLossBackend for Autodiff<B, C> {
    fn ual_ce_forward(logits: FloatTensor<Self>, labels: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct UalCeBackward;

        impl<B: UalLossBackend> Backward<B, 1> for UalCeBackward {
            type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [logits_node] = ops.parents;
                let grad_stats = grads.consume::<B>(&ops.node);
                let (logits, labels, stats) = ops.state;
                if let Some(node) = logits_node {
                    grads.register::<B>(
                        node.id,
                        B::ual_ce_backward(logits, labels, stats, grad_stats),
                    );
                }
            }
        }

        let (logits, logits_node) = logits.into_parts();
        let (labels, _) = labels.into_parts();
        let stats = B::ual_ce_forward(logits.clone(), labels.clone());
        match UalCeBackward
            .prepare::<C>([logits_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((logits, labels, stats.clone()), stats),
            OpsKind::UnTracked(prep) => prep.finish(stats),
        }
    }

    fn ual_linear_ce_sum(
        hidden: FloatTensor<Self>,
        head: FloatTensor<Self>,
        labels: FloatTensor<Self>,
        blocks: HeadBlocks,
    ) -> FloatTensor<Self> {
        linear_ce_sum::<B, C>(hidden, head, labels, blocks)
    }
}
/// The autodiff implementation: gradients are formed in the forward pass when a parent is
/// tracked, and scaled by the upstream gradient in the backward pass.
fn linear_ce_sum<B: UalLossBackend, C: CheckpointStrategy>(
    hidden: FloatTensor<Autodiff<B, C>>,
    head: FloatTensor<Autodiff<B, C>>,
    labels: FloatTensor<Autodiff<B, C>>,
    blocks: HeadBlocks,
) -> FloatTensor<Autodiff<B, C>> {
    #[derive(Debug)]
    struct LinearCeBackward;

    impl<B: Backend> Backward<B, 2> for LinearCeBackward {
        type State = (Option<FloatTensor<B>>, Option<FloatTensor<B>>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let upstream = grads.consume::<B>(&ops.node);
            let upstream = B::float_reshape(upstream, Shape::new([1, 1]));
            let [hidden_node, head_node] = ops.parents;
            let (grad_hidden, grad_head) = ops.state;
            for (node, grad) in [(hidden_node, grad_hidden), (head_node, grad_head)] {
                if let (Some(node), Some(grad)) = (node, grad) {
                    grads.register::<B>(node.id, B::float_mul(grad, upstream.clone()));
                }
            }
        }
    }

    let (want_hidden, want_head) = (hidden.is_tracked(), head.is_tracked());
    let (hidden, hidden_node) = hidden.into_parts();
    let (head, head_node) = head.into_parts();
    let (labels, _) = labels.into_parts();
    match LinearCeBackward
        .prepare::<C>([hidden_node, head_node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (sum, grad_hidden, grad_head) =
                B::ual_linear_ce_grads(hidden, head, labels, blocks, want_hidden, want_head);
            prep.finish((grad_hidden, grad_head), sum)
        }
        OpsKind::UnTracked(prep) => {
            let sum = B::ual_linear_ce_sum(hidden, head, labels, blocks);
            prep.finish(sum)
        }
    }
}
