//! The best held-out NLL so far, for `keep_best` and `early_stop_patience`. It travels in
//! every checkpoint, so that a resumed run stops where an uninterrupted one would have.

use serde::{Deserialize, Serialize};

/// The step whose held-out NLL is the lowest so far, and the evaluations since.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Best {
    pub step: usize,
    pub eval_nll: f64,
    /// Evaluations after `step` that did not go below its NLL.
    pub since: usize,
}

impl Best {
    /// Counts the evaluation of `step`; true when it is the new best.
    pub fn observe(best: &mut Option<Best>, step: usize, eval_nll: f64) -> bool {
        match best {
            Some(b) if eval_nll >= b.eval_nll => {
                b.since += 1;
                false
            }
            _ => {
                *best = Some(Best {
                    step,
                    eval_nll,
                    since: 0,
                });
                true
            }
        }
    }

    /// Whether `patience` evaluations in a row have gone by without a new best (never, for 0).
    pub fn exhausted(best: Option<Best>, patience: usize) -> bool {
        patience > 0 && best.is_some_and(|b| b.since >= patience)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patience_counts_evaluations_without_a_lower_nll() {
        let mut best = None;
        let nlls = [3.0, 2.5, 2.6, 2.5, 2.4, 2.45, 2.41];
        let mut stopped = None;
        for (i, nll) in nlls.into_iter().enumerate() {
            Best::observe(&mut best, i + 1, nll);
            if stopped.is_none() && Best::exhausted(best, 2) {
                stopped = Some(i + 1);
            }
        }
        // 2.6 and the tie at 2.5 do not beat 2.5; 2.4 would have, but the run stopped first.
        assert_eq!(stopped, Some(4));
        assert_eq!(best.map(|b| (b.step, b.since)), Some((5, 2)));
        assert!(!Best::exhausted(best, 0));
    }
}
