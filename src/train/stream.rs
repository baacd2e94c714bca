//! The order in which training batches are drawn.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::config::Sampling;
use crate::data::batch::{Sample, length_buckets};

/// Batches in a seeded order: length buckets shuffled epoch after epoch, or micro-batches drawn
/// with replacement (the draw is a function of the seed and its index, so a resumed run draws
/// what an uninterrupted one would have).
pub(crate) struct BatchStream {
    buckets: Vec<Vec<usize>>,
    order: Vec<usize>,
    /// Batches consumed in `epoch` (with replacement: batches drawn so far).
    pub(crate) position: usize,
    pub(crate) epoch: u64,
    seed: u64,
    /// `Some((samples, batch_size))` when drawing with replacement.
    replacement: Option<(usize, usize)>,
}

impl BatchStream {
    pub(crate) fn new(
        samples: &[Sample],
        batch_size: usize,
        sampling: Sampling,
        seed: u64,
    ) -> Self {
        let replacement =
            (sampling == Sampling::Replacement).then_some((samples.len(), batch_size.max(1)));
        let mut stream = Self {
            order: Vec::new(),
            buckets: length_buckets(samples, batch_size),
            position: 0,
            epoch: 0,
            seed,
            replacement,
        };
        stream.shuffle();
        stream
    }

    fn shuffle(&mut self) {
        self.order = (0..self.buckets.len()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed.wrapping_add(self.epoch));
        self.order.shuffle(&mut rng);
    }

    /// Continues from a checkpointed position.
    pub(crate) fn seek(&mut self, epoch: u64, position: usize) {
        self.epoch = epoch;
        self.shuffle();
        // Data that shrank since the checkpoint (`--allow-data-change`) ends the epoch here.
        self.position = match self.replacement {
            Some(_) => position,
            None => position.min(self.order.len()),
        };
    }

    /// The sample indices of the next micro-batch.
    pub(crate) fn next_batch(&mut self) -> Vec<usize> {
        if let Some((samples, batch_size)) = self.replacement {
            let draw = self.seed ^ (self.position as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut rng = rand::rngs::StdRng::seed_from_u64(draw);
            self.position += 1;
            return (0..batch_size)
                .map(|_| rng.random_range(0..samples))
                .collect();
        }
        if self.position == self.order.len() {
            self.epoch += 1;
            self.position = 0;
            self.shuffle();
        }
        self.position += 1;
        self.buckets[self.order[self.position - 1]].clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::shard;

    fn samples(n: usize) -> Vec<Sample> {
        (0..n)
            .map(|i| Sample {
                ids: vec![1; 3 + i % 7],
                loss_mask: vec![true; 3 + i % 7],
                epsilon: 0.0,
                smoothing: 0.0,
                line: i + 1,
                uncertainty: None,
            })
            .collect()
    }

    /// What `ranks` ranks with micro-batch `batch` take over one epoch: every sample exactly
    /// once, and together the batches one rank with `ranks × batch` would take.
    #[test]
    fn an_epoch_sharded_over_ranks_takes_every_sample_once() {
        for (n, ranks, batch) in [(430, 2, 4), (37, 3, 5), (5, 4, 1), (64, 2, 32)] {
            let samples = samples(n);
            let mut global = BatchStream::new(&samples, ranks * batch, Sampling::Shuffle, 7);
            let mut whole = BatchStream::new(&samples, ranks * batch, Sampling::Shuffle, 7);
            let mut seen = vec![0usize; n];
            while global.epoch == 0 && (global.position < global.order.len()) {
                let drawn = global.next_batch();
                let mut joined = Vec::new();
                for rank in 0..ranks {
                    let mine = &drawn[shard::slice(drawn.len(), rank, ranks)];
                    assert!(mine.len() <= batch, "a rank's slice fits its micro-batch");
                    mine.iter().for_each(|&i| seen[i] += 1);
                    joined.extend_from_slice(mine);
                }
                assert_eq!(joined, whole.next_batch(), "the one-rank batch, in order");
            }
            assert!(
                seen.iter().all(|&c| c == 1),
                "n {n}, ranks {ranks}: {seen:?}"
            );
        }
    }
}
