//! Evaluation: per-token log-probabilities, held-out loss by uncertainty, GSM8K accuracy.

pub mod answers;
pub mod clustering;
pub mod features;
pub mod gsm8k;
pub mod heldout;
pub mod paper;
pub mod score;

/// Items graded right or wrong: the part of every accuracy report that is the same.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Graded<R> {
    /// Items asked.
    pub total: usize,
    /// Items answered correctly.
    pub correct: usize,
    /// `correct / total`.
    pub accuracy: f64,
    /// Every item's record.
    pub items: Vec<R>,
}

/// Grades the items `batch` at a time (decoded together) with a progress bar that shows the
/// running accuracy; `grade(first, chunk)` returns each item's record and whether it was
/// answered correctly, for the items `first..first + chunk.len()`.
///
/// Under `mpirun` the ranks grade slices of the batches and every rank gets all the records,
/// in item order; rank 0's bar shows its own slice.
pub(crate) fn grade_all<I, R: serde::Serialize + serde::de::DeserializeOwned>(
    items: &[I],
    batch: usize,
    mut grade: impl FnMut(usize, &[I]) -> anyhow::Result<Vec<(R, bool)>>,
) -> anyhow::Result<Graded<R>> {
    let cluster = crate::cluster::world();
    let batch = batch.max(1);
    let batches: Vec<std::ops::Range<usize>> = (0..items.len())
        .step_by(batch)
        .map(|start| start..(start + batch).min(items.len()))
        .collect();
    let mine = crate::cluster::shard::slice(batches.len(), cluster.rank(), cluster.size());
    let progress = match cluster.is_root() {
        true => indicatif::ProgressBar::new(batches[mine].iter().map(|r| r.len() as u64).sum()),
        false => indicatif::ProgressBar::hidden(),
    };
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]")
            .expect("static template"),
    );
    let (mut seen, mut right_so_far) = (0usize, 0usize);
    let graded = cluster.share_work(&batches, "grading the items", |_, range| {
        let graded = grade(range.start, &items[range.clone()])?;
        seen += graded.len();
        right_so_far += graded.iter().filter(|(_, right)| *right).count();
        let accuracy = 100.0 * right_so_far as f64 / seen.max(1) as f64;
        progress.set_message(format!("accuracy {accuracy:.1}%"));
        progress.inc(graded.len() as u64);
        Ok(graded)
    })?;
    progress.finish();
    let graded: Vec<(R, bool)> = graded.into_iter().flatten().collect();
    let correct = graded.iter().filter(|(_, right)| *right).count();
    let records: Vec<R> = graded.into_iter().map(|(record, _)| record).collect();
    Ok(Graded {
        total: records.len(),
        correct,
        accuracy: correct as f64 / records.len().max(1) as f64,
        items: records,
    })
}
