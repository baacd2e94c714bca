//! Evaluation: per-token log-probabilities, and later held-out loss and GSM8K accuracy.

pub mod score;
