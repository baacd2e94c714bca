//! `winrate.svg`: the win, tie and loss rates as bars with their 95% intervals.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use super::JudgeSummary;
use super::interval::Rate;

/// Draws the summary's three rates, written atomically.
pub fn draw(summary: &JudgeSummary, path: &Path) -> Result<()> {
    let bars = [
        ("a wins", summary.rates.win, RGBColor(46, 125, 50)),
        ("tie", summary.rates.tie, RGBColor(158, 158, 158)),
        ("a loses", summary.rates.loss, RGBColor(198, 40, 40)),
    ];
    let title = format!(
        "{} vs {} ({} prompts, judge {})",
        short(&summary.a),
        short(&summary.b),
        summary.judged,
        summary.judge
    );
    let svg = bar_chart(&title, "share of judged prompts", &bars)?;
    crate::util::write_atomic(path, svg.as_bytes())
}

/// A bar chart of rates in [0, 1] with interval whiskers, as SVG text.
pub fn bar_chart(title: &str, y_label: &str, bars: &[(&str, Rate, RGBColor)]) -> Result<String> {
    let err = |e: &dyn std::fmt::Display| anyhow!("cannot draw {title:?}: {e}");
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (640, 400)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let labels: Vec<String> = bars.iter().map(|b| b.0.to_string()).collect();
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..bars.len() as f64, 0f64..1f64)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(bars.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x.fract() - 0.5).abs() < 1e-6 && i < labels.len() {
                    labels[i].clone()
                } else {
                    String::new()
                }
            })
            .y_desc(y_label)
            .draw()
            .map_err(|e| err(&e))?;
        for (i, (_, rate, color)) in bars.iter().enumerate() {
            let x = i as f64;
            let value = if rate.value.is_finite() {
                rate.value
            } else {
                0.0
            };
            chart
                .draw_series([Rectangle::new(
                    [(x + 0.2, 0.0), (x + 0.8, value)],
                    color.filled(),
                )])
                .map_err(|e| err(&e))?;
            let [lo, hi] = rate.ci95;
            if lo.is_finite() && hi.is_finite() {
                let whisker = [(x + 0.5, lo), (x + 0.5, hi)];
                chart
                    .draw_series([PathElement::new(whisker, BLACK.stroke_width(2))])
                    .map_err(|e| err(&e))?;
            }
        }
        root.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

/// The last two components of a path, enough to tell runs apart.
fn short(path: &str) -> String {
    let parts: Vec<&str> = path.rsplit('/').take(2).collect();
    parts.into_iter().rev().collect::<Vec<_>>().join("/")
}
