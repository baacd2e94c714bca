//! Evaluation: per-token log-probabilities, held-out loss by uncertainty, GSM8K accuracy.

pub mod answers;
pub mod clustering;
pub mod features;
pub mod gsm8k;
pub mod heldout;
pub mod paper;
pub mod score;
