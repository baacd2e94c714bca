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

/// Grades every item in turn with a progress bar that shows the running accuracy; `grade`
/// returns an item's record and whether it was answered correctly.
pub(crate) fn grade_all<I, R>(
    items: &[I],
    mut grade: impl FnMut(usize, &I) -> anyhow::Result<(R, bool)>,
) -> anyhow::Result<Graded<R>> {
    let progress = indicatif::ProgressBar::new(items.len() as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]")
            .expect("static template"),
    );
    let (mut records, mut correct) = (Vec::with_capacity(items.len()), 0);
    for (i, item) in items.iter().enumerate() {
        let (record, right) = grade(i, item)?;
        records.push(record);
        correct += usize::from(right);
        let accuracy = 100.0 * correct as f64 / records.len() as f64;
        progress.set_message(format!("accuracy {accuracy:.1}%"));
        progress.inc(1);
    }
    progress.finish();
    Ok(Graded {
        total: records.len(),
        correct,
        accuracy: correct as f64 / records.len().max(1) as f64,
        items: records,
    })
}
