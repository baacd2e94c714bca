//! The training-curve plot of a run, `loss.svg`.
//!
//! It draws what is comparable across runs with different ε: the training NLL (plain
//! cross-entropy on the loss tokens, as an exponential moving average, because micro-batches of
//! open-ended and maths samples differ by several nats), the held-out NLL from step 0, and the
//! step's mean ε on a second axis.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use super::StepMetrics;
use super::step::Evaluation;

/// The weight of the newest step in the smoothed training curve.
const SMOOTHING: f64 = 0.1;

/// Draws the run's curves against the step, as SVG.
pub fn plot_losses(
    history: &[StepMetrics],
    initial: Option<Evaluation>,
    path: &Path,
) -> Result<()> {
    let err =
        |e: &dyn std::fmt::Display| anyhow!("{}: cannot draw the loss plot: {e}", path.display());
    let train = smoothed(history.iter().map(|m| (m.step, m.nll)));
    let held_out: Vec<(usize, f64)> = initial
        .map(|e| (0, e.nll))
        .into_iter()
        .chain(history.iter().filter_map(|m| Some((m.step, m.eval_nll?))))
        .filter(|(_, v)| v.is_finite())
        .collect();
    let (lo, hi) = bounds(train.iter().chain(&held_out).map(|p| p.1));
    let eps_hi = history
        .iter()
        .map(|m| m.mean_eps)
        .fold(0.0, f64::max)
        .max(1e-3)
        * 1.1;
    let steps = history.last().map(|m| m.step).unwrap_or(1).max(1);

    let root = SVGBackend::new(path, (760, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("UAL training: NLL and smoothing", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .right_y_label_area_size(50)
        .build_cartesian_2d(0usize..steps, lo..hi)
        .map_err(|e| err(&e))?
        .set_secondary_coord(0usize..steps, 0.0..eps_hi);
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("NLL (nats per token)")
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .configure_secondary_axes()
        .y_desc("mean ε")
        .draw()
        .map_err(|e| err(&e))?;
    let grey = RGBColor(150, 150, 150);
    chart
        .draw_secondary_series(LineSeries::new(
            history.iter().map(|m| (m.step, m.mean_eps)),
            grey,
        ))
        .map_err(|e| err(&e))?
        .label("mean ε (right axis)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey));
    chart
        .draw_series(LineSeries::new(train, &BLUE))
        .map_err(|e| err(&e))?
        .label("training NLL (smoothed)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    // Each evaluation marked: a line through three points hides that there are three.
    chart
        .draw_series(held_out.iter().map(|&p| Circle::new(p, 4, RED.filled())))
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(held_out, RED.stroke_width(2)))
        .map_err(|e| err(&e))?
        .label("held-out NLL")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// An exponential moving average of `points`, skipping non-finite values.
fn smoothed(points: impl Iterator<Item = (usize, f64)>) -> Vec<(usize, f64)> {
    let mut average: Option<f64> = None;
    points
        .filter(|(_, v)| v.is_finite())
        .map(|(step, v)| {
            let next = average.map_or(v, |a| a + SMOOTHING * (v - a));
            average = Some(next);
            (step, next)
        })
        .collect()
}

/// The y range that shows `values` with a margin.
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo.is_finite() {
        let margin = ((hi - lo) * 0.1).max(0.05);
        (lo - margin, hi + margin)
    } else {
        (0.0, 1.0)
    }
}
