//! Win, tie and loss rates with 95% confidence intervals, by the percentile bootstrap over
//! prompts: resample the judged prompts with replacement, recompute each rate, and take the
//! 2.5th and 97.5th percentiles of what comes out. Seeded, so a report can be reproduced.

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;

use super::verdict::Outcome;

/// One rate and its interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rate {
    /// The share of judged prompts.
    pub value: f64,
    /// The 95% percentile-bootstrap interval, `[low, high]`.
    pub ci95: [f64; 2],
}

/// Every rate of a comparison of `a` against `b`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rates {
    /// Prompts both orders gave to `a`.
    pub win: Rate,
    /// Prompts the orders split or called even.
    pub tie: Rate,
    /// Prompts both orders gave to `b`.
    pub loss: Rate,
    /// `win + tie / 2`: how often `a` is preferred, counting a tie as half (0.5 is parity).
    pub preference: Rate,
}

/// The rates of `outcomes` with intervals from `resamples` bootstrap draws seeded by `seed`.
/// No outcomes give every rate and bound as NaN.
pub fn rates(outcomes: &[Outcome], resamples: usize, seed: u64) -> Rates {
    let point = shares(outcomes.iter());
    let mut rng = StdRng::seed_from_u64(seed);
    let n = outcomes.len();
    let draws: Vec<[f64; 4]> = (0..if n == 0 { 0 } else { resamples })
        .map(|_| shares((0..n).map(|_| &outcomes[rng.random_range(0..n)])))
        .collect();
    let rate = |k: usize| {
        let mut values: Vec<f64> = draws.iter().map(|d| d[k]).collect();
        values.sort_by(f64::total_cmp);
        Rate {
            value: point[k],
            ci95: [percentile(&values, 0.025), percentile(&values, 0.975)],
        }
    };
    Rates {
        win: rate(0),
        tie: rate(1),
        loss: rate(2),
        preference: rate(3),
    }
}

/// Win, tie, loss and preference shares of some outcomes.
fn shares<'a>(outcomes: impl Iterator<Item = &'a Outcome>) -> [f64; 4] {
    let mut counts = [0usize; 3];
    for o in outcomes {
        counts[*o as usize] += 1;
    }
    let n = counts.iter().sum::<usize>() as f64;
    let [w, t, l] = counts.map(|c| c as f64 / n);
    [w, t, l, w + t / 2.0]
}

/// The `q`-quantile of sorted `values`, interpolating linearly between ranks (numpy's default);
/// NaN when there are none.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n => {
            let at = q * (n - 1) as f64;
            let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (at - lo as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Outcome::*;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        // numpy.percentile([0, 1, 2, 3, 4], [2.5, 50, 97.5]) = [0.1, 2.0, 3.9]
        let v = [0.0, 1.0, 2.0, 3.0, 4.0];
        for (q, want) in [(0.025, 0.1), (0.5, 2.0), (0.975, 3.9)] {
            assert!((percentile(&v, q) - want).abs() < 1e-12, "q {q}");
        }
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn a_unanimous_comparison_has_no_spread() {
        let r = rates(&[Win; 20], 500, 1);
        assert_eq!(
            r.win,
            Rate {
                value: 1.0,
                ci95: [1.0, 1.0]
            }
        );
        assert_eq!(r.loss.ci95, [0.0, 0.0]);
        assert_eq!(r.preference.value, 1.0);
    }

    #[test]
    fn the_interval_matches_the_normal_approximation() {
        // 120 wins, 80 ties, 200 losses of 400: the win rate's standard error is
        // sqrt(0.3 * 0.7 / 400) = 0.0229, so its 95% interval is about 0.3 ± 0.0449. Two
        // thousand draws put each bound within 0.01 of that.
        let outcomes: Vec<Outcome> = [(Win, 120), (Tie, 80), (Loss, 200)]
            .iter()
            .flat_map(|&(o, n)| std::iter::repeat_n(o, n))
            .collect();
        let r = rates(&outcomes, 2000, 7);
        assert_eq!(r.win.value, 0.3);
        assert!((r.win.ci95[0] - (0.3 - 0.0449)).abs() < 0.01, "{:?}", r.win);
        assert!((r.win.ci95[1] - (0.3 + 0.0449)).abs() < 0.01, "{:?}", r.win);
        assert_eq!(r.preference.value, 0.4);
        // Seeded: the same draws again.
        assert_eq!(rates(&outcomes, 2000, 7), r);
    }
}
