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
        self.position = position;
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
