//! Which part of shared work each rank takes.
//!
//! One rule for everything: rank r of n takes the r-th of n contiguous, balanced slices. A
//! global micro-batch sliced so gives, summed over the ranks, exactly the batch one rank would
//! have taken whole; lines sliced so come back in input order when rank 0 concatenates the
//! ranks' results in rank order.

use std::ops::Range;

/// The slice of `0..len` that `rank` of `size` takes. Slices differ in length by at most one,
/// and a rank gets an empty one only when `len < size`.
pub fn slice(len: usize, rank: usize, size: usize) -> Range<usize> {
    let size = size.max(1);
    len * rank / size..len * (rank + 1) / size
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_is_taken_exactly_once_in_order() {
        for len in 0..40 {
            for size in 1..7 {
                let all: Vec<usize> = (0..size).flat_map(|r| slice(len, r, size)).collect();
                assert_eq!(all, (0..len).collect::<Vec<_>>(), "len {len}, size {size}");
                let lens: Vec<usize> = (0..size).map(|r| slice(len, r, size).len()).collect();
                let (lo, hi) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
                assert!(hi - lo <= 1, "balanced: {lens:?}");
            }
        }
    }
}
