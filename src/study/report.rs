//! The study's outputs: `results.json` (every run's measures and their summaries), `REPORT.md`
//! (one table of mean ± standard deviation over seeds, the difference from SFT, and a sentence
//! per metric), `loss.svg` and `accuracy.svg`.
//!
//! The difference of an arm from SFT is taken seed by seed (same seed, same batch order) and
//! then summarised. It "exceeds the seed-to-seed spread" when its mean is larger in size than
//! the standard deviation over seeds of both the arm and SFT: a difference smaller than what
//! changing the seed alone does is not evidence of anything.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;
use serde::Serialize;

use super::RunRecord;
use super::config::{StudyConfig, arm_name};
use crate::judge::chart::bar_chart;
use crate::judge::interval::Rate;
use crate::uncertainty::LossKind;

/// Which way is better on a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Better {
    /// Higher is better.
    Higher,
    /// Lower is better.
    Lower,
    /// Neither: a description, not a score (diversity).
    Neither,
}

/// One metric the study reports.
pub struct Metric {
    /// The key in `results.json`.
    pub key: &'static str,
    /// Its name in the report.
    pub title: &'static str,
    /// Which way is better.
    pub better: Better,
    /// Its value in one run.
    pub value: fn(&RunRecord) -> Option<f64>,
}

/// Every metric, in report order.
pub const METRICS: [Metric; 8] = [
    Metric {
        key: "low_accuracy",
        title: "low-entropy exact match",
        better: Better::Higher,
        value: |r| Some(r.metrics.low_accuracy),
    },
    Metric {
        key: "low_nll",
        title: "low-entropy held-out NLL",
        better: Better::Lower,
        value: |r| Some(r.metrics.low_nll),
    },
    Metric {
        key: "low_ece",
        title: "low-entropy calibration error (ECE)",
        better: Better::Lower,
        value: |r| Some(r.metrics.low_ece),
    },
    Metric {
        key: "high_nll",
        title: "high-entropy NLL of unseen references",
        better: Better::Lower,
        value: |r| Some(r.metrics.high_nll),
    },
    Metric {
        key: "distinct_1",
        title: "high-entropy distinct-1 of sampled answers",
        better: Better::Neither,
        value: |r| Some(r.metrics.distinct_1),
    },
    Metric {
        key: "distinct_2",
        title: "high-entropy distinct-2 of sampled answers",
        better: Better::Neither,
        value: |r| Some(r.metrics.distinct_2),
    },
    Metric {
        key: "silhouette",
        title: "clustering: the authors' mean all-pairs silhouette",
        better: Better::Higher,
        value: |r| r.metrics.silhouette,
    },
    Metric {
        key: "judged_win_rate",
        title: "judged win rate over SFT (ties count half)",
        better: Better::Higher,
        value: |r| r.judged_win_rate,
    },
];

/// Mean and sample standard deviation over seeds (`sd` is NaN for one seed).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    /// The mean.
    pub mean: f64,
    /// The sample standard deviation (n − 1).
    pub sd: f64,
    /// Seeds.
    pub n: usize,
}

impl Spread {
    /// The spread of `values`; `None` for none.
    pub fn of(values: &[f64]) -> Option<Self> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let sd = match n {
            1 => f64::NAN,
            _ => (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt(),
        };
        Some(Self { mean, sd, n })
    }
}

/// One arm on one metric.
#[derive(Debug, Clone, Serialize)]
pub struct ArmSummary {
    /// The arm.
    pub arm: String,
    /// Over its seeds; `None` when the metric was not measured.
    pub spread: Option<Spread>,
    /// Its per-seed difference from SFT, summarised; `None` for SFT itself.
    pub vs_sft: Option<Spread>,
    /// Whether that difference exceeds the seed-to-seed spread; `None` when it cannot be told.
    pub exceeds_spread: Option<bool>,
}

/// One metric over every arm.
#[derive(Debug, Clone, Serialize)]
pub struct MetricSummary {
    /// The key.
    pub key: String,
    /// The name in the report.
    pub title: String,
    /// Which way is better.
    pub better: Better,
    /// Each arm.
    pub arms: Vec<ArmSummary>,
}

/// Where and with what a study's runs were made, recorded when it began.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Origin {
    /// The machine, in words.
    pub machine: String,
    /// The commit of ual that began the study (`-dirty` with uncommitted changes).
    pub commit: String,
}

impl Origin {
    /// This machine and the working directory's commit.
    pub fn here() -> Self {
        Self {
            machine: machine(),
            commit: commit(),
        }
    }

    /// The recorded origin.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
    }
}

/// `results.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// The study's name.
    pub study: String,
    /// The arms, in order.
    pub arms: Vec<String>,
    /// The seeds.
    pub seeds: Vec<u64>,
    /// The device the runs used.
    pub device: String,
    /// Where the runs were made.
    pub origin: Origin,
    /// Every metric summarised.
    pub metrics: Vec<MetricSummary>,
    /// Every run.
    pub runs: Vec<RunRecord>,
}

impl Results {
    /// Summarises `records`.
    pub fn new(study: &StudyConfig, records: &[RunRecord], device: String, origin: Origin) -> Self {
        Self {
            study: study.name.clone(),
            arms: study
                .arms
                .iter()
                .map(|a| arm_name(*a).to_string())
                .collect(),
            seeds: study.seeds.clone(),
            device,
            origin,
            metrics: METRICS
                .iter()
                .map(|m| summarise(m, study, records))
                .collect(),
            runs: records.to_vec(),
        }
    }
}

fn summarise(metric: &Metric, study: &StudyConfig, records: &[RunRecord]) -> MetricSummary {
    let value = |arm: LossKind, seed: u64| {
        let record = records.iter().find(|r| r.arm == arm && r.seed == seed)?;
        // SFT judged against itself is an even split: the 0.5 every preference is read
        // against, so that "ual − sft" is the preference's distance from a tie.
        if metric.key == "judged_win_rate" && arm == LossKind::Sft {
            return Some(0.5);
        }
        (metric.value)(record)
    };
    let values = |arm| -> Vec<f64> { study.seeds.iter().filter_map(|&s| value(arm, s)).collect() };
    let sft = Spread::of(&values(LossKind::Sft));
    let arms = study
        .arms
        .iter()
        .map(|&arm| {
            let spread = Spread::of(&values(arm));
            let vs_sft = (arm != LossKind::Sft)
                .then(|| {
                    let diffs: Vec<f64> = study
                        .seeds
                        .iter()
                        .filter_map(|&s| Some(value(arm, s)? - value(LossKind::Sft, s)?))
                        .collect();
                    Spread::of(&diffs)
                })
                .flatten();
            let exceeds_spread = match (vs_sft, spread, sft) {
                (Some(d), Some(a), Some(b)) if a.n > 1 && b.n > 1 => {
                    Some(d.mean.abs() > a.sd.max(b.sd))
                }
                _ => None,
            };
            ArmSummary {
                arm: arm_name(arm).to_string(),
                spread,
                vs_sft,
                exceeds_spread,
            }
        })
        .collect();
    MetricSummary {
        key: metric.key.into(),
        title: metric.title.into(),
        better: metric.better,
        arms,
    }
}

/// How every number in the report is written: four decimals, and `±` the spread.
pub fn number(spread: &Option<Spread>) -> String {
    match spread {
        None => "not measured".into(),
        Some(s) if s.sd.is_nan() => format!("{:.4}", s.mean),
        Some(s) => format!("{:.4} ± {:.4}", s.mean, s.sd),
    }
}

/// Writes `results.json`, `REPORT.md`, `loss.svg` and `accuracy.svg` into `dir`.
pub fn write(dir: &Path, study: &StudyConfig, source: &str, results: &Results) -> Result<()> {
    let json = serde_json::to_string_pretty(results)? + "\n";
    crate::util::write_atomic(&dir.join("results.json"), json.as_bytes())?;
    crate::util::write_atomic(&dir.join("loss.svg"), loss_plot(results)?.as_bytes())?;
    crate::util::write_atomic(
        &dir.join("accuracy.svg"),
        accuracy_plot(results)?.as_bytes(),
    )?;
    let report = markdown(study, source, results);
    crate::util::write_atomic(&dir.join("REPORT.md"), report.as_bytes())
}

/// `REPORT.md`.
pub fn markdown(study: &StudyConfig, source: &str, results: &Results) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Study `{}`: {}\n",
        results.study,
        results.arms.join(" vs ")
    );
    let _ = writeln!(
        md,
        "Ran with `ual study`, begun at commit `{}` on {} (device: {}). Seeds: {:?}. Every arm trained from the same base on the same data with the same settings; only `smoothing.loss` differs.\n",
        results.origin.commit, results.origin.machine, results.device, results.seeds
    );
    md.push_str(&table(results));
    md.push_str(
        "\nEach cell is the mean ± the standard deviation over seeds; a difference is taken seed by seed against SFT with the same seed. A difference *exceeds the seed-to-seed spread* when its mean is larger in size than the standard deviation over seeds of both the arm and SFT.\n\n## What the numbers say\n\n",
    );
    for metric in &results.metrics {
        for arm in metric.arms.iter().filter(|a| a.arm != "sft") {
            md.push_str(&format!("- {}\n", sentence(metric, arm)));
        }
    }
    if study.judge.endpoint.is_empty() {
        md.push_str(
            "\nThe open-ended answers were **not judged**: the study has no `judge.endpoint`.\n",
        );
    }
    md.push_str(
        "\n## Plots\n\n![held-out NLL per arm](loss.svg)\n\n![exact match per arm](accuracy.svg)\n",
    );
    let _ = write!(
        md,
        "\n## Settings (fixed before any result)\n\n```toml\n{}\n```\n",
        source.trim_end()
    );
    md
}

/// The table: one row per metric, one column per arm, then each arm's difference from SFT.
fn table(results: &Results) -> String {
    let others: Vec<&String> = results.arms.iter().filter(|a| *a != "sft").collect();
    let mut md = String::from("| metric | better |");
    for arm in &results.arms {
        md.push_str(&format!(" {arm} |"));
    }
    for arm in &others {
        md.push_str(&format!(" {arm} − sft |"));
    }
    md.push('\n');
    md.push_str(&"|---".repeat(2 + results.arms.len() + others.len()));
    md.push_str("|\n");
    for metric in &results.metrics {
        let better = match metric.better {
            Better::Higher => "higher",
            Better::Lower => "lower",
            Better::Neither => "—",
        };
        md.push_str(&format!("| {} | {better} |", metric.title));
        for arm in &metric.arms {
            let text = match (metric.key.as_str(), arm.arm.as_str()) {
                // SFT is what every preference is measured against.
                ("judged_win_rate", "sft") => "baseline".to_string(),
                _ => cell(metric, &arm.spread),
            };
            md.push_str(&format!(" {text} |"));
        }
        for arm in metric.arms.iter().filter(|a| a.arm != "sft") {
            md.push_str(&format!(" {} |", cell(metric, &arm.vs_sft)));
        }
        md.push('\n');
    }
    md
}

fn cell(metric: &MetricSummary, spread: &Option<Spread>) -> String {
    match (metric.key.as_str(), spread) {
        ("judged_win_rate", None) => "not judged".into(),
        _ => number(spread),
    }
}

/// One plain sentence: the difference, its direction, and whether it exceeds the spread.
fn sentence(metric: &MetricSummary, arm: &ArmSummary) -> String {
    let Some(diff) = arm.vs_sft else {
        let missing = match metric.key.as_str() {
            "judged_win_rate" => "not judged",
            _ => "not measured",
        };
        return format!("**{}, {}**: {missing}.", metric.title, arm.arm);
    };
    let size = Some(Spread {
        mean: diff.mean.abs(),
        ..diff
    });
    let direction = match metric.better {
        _ if diff.mean == 0.0 => "the same as SFT".to_string(),
        Better::Neither if diff.mean > 0.0 => format!("higher than SFT by {}", number(&size)),
        Better::Neither => format!("lower than SFT by {}", number(&size)),
        better => {
            let good = (diff.mean > 0.0) == (better == Better::Higher);
            format!(
                "{} than SFT ({}) by {}",
                if diff.mean > 0.0 { "higher" } else { "lower" },
                if good { "better" } else { "worse" },
                number(&size)
            )
        }
    };
    let verdict = match arm.exceeds_spread {
        Some(true) => "the difference exceeds the seed-to-seed spread",
        Some(false) => "the difference does not exceed the seed-to-seed spread",
        None => "with one seed there is no spread to compare it with",
    };
    format!(
        "**{}, {}**: {} is {direction}; {verdict}.",
        metric.title, arm.arm, arm.arm
    )
}

/// Mean held-out NLL per arm against the step (each arm's seeds averaged step by step).
fn loss_plot(results: &Results) -> Result<String> {
    let err = |e: &dyn std::fmt::Display| anyhow!("cannot draw the study's loss plot: {e}");
    let curves: Vec<(String, Vec<(usize, f64)>)> = results
        .arms
        .iter()
        .map(|arm| (arm.clone(), mean_curve(results, arm)))
        .collect();
    let points = || curves.iter().flat_map(|(_, c)| c.iter());
    let steps = points().map(|p| p.0).max().unwrap_or(1).max(1);
    let lo = points().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = points().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo < hi { (lo, hi) } else { (0.0, 1.0) };
    let pad = (hi - lo) * 0.05;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 440)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("held-out NLL per arm (mean over seeds)", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0usize..steps, (lo - pad)..(hi + pad))
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("NLL (nats per token)")
            .draw()
            .map_err(|e| err(&e))?;
        for (i, (arm, curve)) in curves.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    curve.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| err(&e))?
                .label(arm.as_str())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

/// An arm's curve averaged over its seeds at the steps every seed evaluated.
fn mean_curve(results: &Results, arm: &str) -> Vec<(usize, f64)> {
    let runs: Vec<&RunRecord> = results
        .runs
        .iter()
        .filter(|r| arm_name(r.arm) == arm)
        .collect();
    let Some(first) = runs.first() else {
        return Vec::new();
    };
    first
        .curve
        .iter()
        .filter_map(|&(step, _)| {
            let values: Vec<f64> = runs
                .iter()
                .filter_map(|r| r.curve.iter().find(|p| p.0 == step).map(|p| p.1))
                .collect();
            (values.len() == runs.len())
                .then(|| (step, values.iter().sum::<f64>() / values.len() as f64))
        })
        .collect()
}

/// Exact match per arm, bars at the mean, whiskers at ± one standard deviation.
fn accuracy_plot(results: &Results) -> Result<String> {
    let accuracy = results
        .metrics
        .iter()
        .find(|m| m.key == "low_accuracy")
        .expect("accuracy is a metric");
    let bars: Vec<(&str, Rate, RGBColor)> = accuracy
        .arms
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let s = a.spread.unwrap_or(Spread {
                mean: f64::NAN,
                sd: f64::NAN,
                n: 0,
            });
            let sd = if s.sd.is_nan() { 0.0 } else { s.sd };
            let rgb = Palette99::pick(i).to_rgba().rgb();
            let rate = Rate {
                value: s.mean,
                ci95: [s.mean - sd, s.mean + sd],
            };
            (a.arm.as_str(), rate, RGBColor(rgb.0, rgb.1, rgb.2))
        })
        .collect();
    bar_chart(
        "low-entropy exact match per arm (mean ± sd over seeds)",
        "exact match",
        &bars,
    )
}

/// The CPU, in words, and its core count.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores, {}", std::env::consts::OS)
}

/// `git rev-parse --short HEAD` of the working directory, `-dirty` with uncommitted changes.
fn commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(hash) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty { format!("{hash}-dirty") } else { hash }
        }
        None => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_the_sample_standard_deviation() {
        // Values 1, 2, 3, 4: mean 2.5, sample variance 5/3.
        let s = Spread::of(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(s.mean, 2.5);
        assert!((s.sd - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert!(Spread::of(&[7.0]).unwrap().sd.is_nan());
        assert!(Spread::of(&[]).is_none());
    }

    /// A judged study reports the preference beside SFT's even split: the "ual − sft" cell
    /// and the sentence once said "not judged" while the ual column showed 0.5000.
    #[test]
    fn a_judged_win_rate_is_read_against_an_even_split() {
        let study = StudyConfig::load(std::path::Path::new("studies/mixed-tiny.toml")).unwrap();
        let metrics = crate::study::evaluate::RunMetrics {
            low_accuracy: 0.5,
            low_nll: 1.0,
            low_ece: 0.1,
            high_nll: 2.0,
            distinct_1: 0.5,
            distinct_2: 0.5,
            silhouette: None,
        };
        let records: Vec<RunRecord> = study
            .arms
            .iter()
            .flat_map(|&arm| study.seeds.iter().map(move |&seed| (arm, seed)))
            .map(|(arm, seed)| RunRecord {
                arm,
                seed,
                metrics: metrics.clone(),
                judged_win_rate: (arm != LossKind::Sft).then_some(0.625),
                curve: Vec::new(),
            })
            .collect();
        let metric = METRICS.iter().find(|m| m.key == "judged_win_rate").unwrap();
        let summary = summarise(metric, &study, &records);
        for arm in summary.arms.iter().filter(|a| a.arm != "sft") {
            let diff = arm.vs_sft.expect("judged against SFT");
            assert!((diff.mean - 0.125).abs() < 1e-12, "{}", diff.mean);
            assert_eq!(cell(&summary, &arm.vs_sft), number(&arm.vs_sft));
            assert!(!sentence(&summary, arm).contains("not judged"));
        }
    }

    #[test]
    fn numbers_are_written_one_way() {
        let s = Some(Spread {
            mean: 0.12345,
            sd: 0.01,
            n: 3,
        });
        assert_eq!(number(&s), "0.1235 ± 0.0100");
        assert_eq!(number(&None), "not measured");
    }
}
