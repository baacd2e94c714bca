//! The loss-curve plot of a run.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use super::StepMetrics;

/// Draws training loss (and evaluation loss where measured) against the step, as SVG.
pub fn plot_losses(history: &[StepMetrics], path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    let err =
        |e: &dyn std::fmt::Display| anyhow!("{}: cannot draw the loss plot: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let losses = history
        .iter()
        .map(|m| m.loss)
        .chain(history.iter().filter_map(|m| m.eval_loss));
    let (lo, hi) = losses.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let (lo, hi) = if lo.is_finite() {
        (lo * 0.95, hi * 1.05)
    } else {
        (0.0, 1.0)
    };
    let mut chart = ChartBuilder::on(&root)
        .caption("UAL training loss", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0usize..history.len().max(1), lo..hi)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(
            history.iter().map(|m| (m.step, m.loss)),
            &BLUE,
        ))
        .map_err(|e| err(&e))?
        .label("train")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(
            history.iter().filter_map(|m| Some((m.step, m.eval_loss?))),
            &RED,
        ))
        .map_err(|e| err(&e))?
        .label("eval")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
