//! ual's own feature analysis (`--protocol ual`), not the authors' (that is `super::clustering`):
//! the last-layer hidden states of response tokens, grouped by target id, over all classes at
//! once, with two standard figures:
//!
//! - the silhouette score (Euclidean; sklearn's definition; classes with one member left out),
//!   in [-1, 1], higher is better clustered;
//! - the ratio of the mean intra-class to the mean inter-class distance, lower is better.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use plotters::prelude::*;
use serde::Serialize;

use burn::tensor::Device;

use crate::data::batch::{Prepare, Sample};
use crate::data::template::{Template, TemplateKind};
use crate::loss::Batch;
use crate::model::{Llama, Pretrained};

/// How well one model's response-token features cluster by target id.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterQuality {
    /// Which model: `base` or `base + ADAPTER`.
    pub label: String,
    /// Tokens measured.
    pub tokens: usize,
    /// Classes (target ids) with at least two members.
    pub classes: usize,
    /// Mean silhouette, in [-1, 1], higher is better clustered.
    pub silhouette: f64,
    /// Mean intra-class over mean inter-class distance, lower is better.
    pub intra_inter_ratio: f64,
}

/// The final-norm hidden state of each response token (the state that predicts it) and its
/// target id, at most `max_tokens` of them, in sample order.
pub fn response_features(
    model: &Llama,
    samples: &[Sample],
    max_tokens: usize,
) -> Result<(Vec<Vec<f32>>, Vec<u32>)> {
    let (mut points, mut labels) = (Vec::new(), Vec::new());
    for sample in samples {
        if points.len() >= max_tokens {
            break;
        }
        let batch = Batch::new(&[sample], &model.device())?;
        let hidden = model.hidden_states(batch.ids.clone());
        let [b, s, h] = hidden.dims();
        let rows = hidden.reshape([b * s, h]).select(0, batch.rows.clone());
        let values = rows
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| anyhow!("{e:?}"))?;
        for (row, &target) in values.chunks_exact(h).zip(batch.labels.targets()) {
            points.push(row.to_vec());
            labels.push(target);
        }
    }
    points.truncate(max_tokens);
    labels.truncate(max_tokens);
    Ok((points, labels))
}

/// Both cluster figures for labelled points; classes with a single member are left out.
pub fn cluster_quality(label: &str, points: &[Vec<f32>], labels: &[u32]) -> Result<ClusterQuality> {
    let mut counts: HashMap<u32, usize> = HashMap::new();
    labels
        .iter()
        .for_each(|l| *counts.entry(*l).or_default() += 1);
    let keep: Vec<usize> = (0..labels.len())
        .filter(|&i| counts[&labels[i]] > 1)
        .collect();
    let classes = keep
        .iter()
        .map(|&i| labels[i])
        .collect::<std::collections::HashSet<_>>()
        .len();
    if classes < 2 {
        bail!("need at least two target ids that occur twice; got {classes}");
    }
    let dist = |a: usize, b: usize| -> f64 {
        points[a]
            .iter()
            .zip(&points[b])
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let (mut silhouette, mut intra, mut inter, mut n_intra, mut n_inter) =
        (0.0, 0.0, 0.0, 0usize, 0usize);
    for &i in &keep {
        // Mean distance from i to each class.
        let mut per_class: HashMap<u32, (f64, usize)> = HashMap::new();
        for &j in keep.iter().filter(|&&j| j != i) {
            let d = dist(i, j);
            let e = per_class.entry(labels[j]).or_default();
            e.0 += d;
            e.1 += 1;
            if labels[j] == labels[i] {
                (intra, n_intra) = (intra + d, n_intra + 1);
            } else {
                (inter, n_inter) = (inter + d, n_inter + 1);
            }
        }
        let a = per_class
            .get(&labels[i])
            .map(|(s, n)| s / *n as f64)
            .unwrap_or(0.0);
        let b = per_class
            .iter()
            .filter(|(l, _)| **l != labels[i])
            .map(|(_, (s, n))| s / *n as f64)
            .fold(f64::INFINITY, f64::min);
        silhouette += if a.max(b) > 0.0 {
            (b - a) / a.max(b)
        } else {
            0.0
        };
    }
    Ok(ClusterQuality {
        label: label.to_string(),
        tokens: keep.len(),
        classes,
        silhouette: silhouette / keep.len() as f64,
        intra_inter_ratio: (intra / n_intra.max(1) as f64) / (inter / n_inter.max(1) as f64),
    })
}

/// A bar chart of the silhouette score of each measured model.
pub fn plot(results: &[ClusterQuality], path: &Path) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("{}: cannot draw the plot: {e}", path.display());
    let root = SVGBackend::new(path, (640, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let lo = results.iter().map(|r| r.silhouette).fold(0.0, f64::min) - 0.05;
    let hi = results.iter().map(|r| r.silhouette).fold(0.0, f64::max) + 0.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Response-token clustering (silhouette, higher is better)",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..results.len() as f64, lo..hi)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_labels(results.len().max(1))
        .x_label_formatter(&|x| {
            results
                .get(*x as usize)
                .map(|r| r.label.clone())
                .unwrap_or_default()
        })
        .y_desc("silhouette")
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(results.iter().enumerate().map(|(i, r)| {
            Rectangle::new(
                [(i as f64 + 0.2, 0.0), (i as f64 + 0.8, r.silhouette)],
                BLUE.filled(),
            )
        }))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Cluster quality of the base model in `model_dir`, then of base + `adapter` when one is given,
/// on the response tokens of the training-schema file `data`.
pub fn compare(
    model_dir: &Path,
    adapter: Option<&Path>,
    template: TemplateKind,
    data: &Path,
    max_tokens: usize,
    device: &Device,
    types: crate::model::precision::Resolved,
) -> Result<Vec<ClusterQuality>> {
    let template = Template::load(template, model_dir)?;
    let mut variants = vec![(None, "base".to_string())];
    if let Some(adapter) = adapter {
        variants.push((Some(adapter), format!("base + {}", adapter.display())));
    }
    let mut results = Vec::new();
    for (adapter, label) in variants {
        let pretrained = Pretrained::load_with_adapter_as(model_dir, adapter, device, types)?;
        let eos = pretrained.config.eos_token_id()?;
        let (_, samples, _) =
            Prepare::new(&pretrained.tokenizer, &template, eos, 2048).file(data)?;
        let (points, labels) = response_features(&pretrained.model, &samples, max_tokens)?;
        results.push(cluster_quality(&label, &points, &labels)?);
    }
    Ok(results)
}

/// Writes `features.json` and `features.svg` into `output` and returns the JSON.
pub fn write_report(results: &[ClusterQuality], data: &Path, output: &Path) -> Result<String> {
    std::fs::create_dir_all(output)
        .with_context(|| format!("cannot create {}", output.display()))?;
    let json = serde_json::to_string_pretty(&serde_json::json!({
        "metric": "silhouette (Euclidean) and mean intra/inter-class distance of last hidden states, by target id",
        "data": data.display().to_string(),
        "results": results,
    }))?;
    crate::util::write_atomic(&output.join("features.json"), json.as_bytes())?;
    plot(results, &output.join("features.svg"))?;
    Ok(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs(spread: f32) -> (Vec<Vec<f32>>, Vec<u32>) {
        let mut points = Vec::new();
        let mut labels = Vec::new();
        for class in 0..3u32 {
            for k in 0..10 {
                let jitter = ((k * 37 + class as usize * 11) % 17) as f32 / 17.0 - 0.5;
                points.push(vec![class as f32 * 10.0 + jitter * spread, jitter * spread]);
                labels.push(class);
            }
        }
        (points, labels)
    }

    #[test]
    fn separated_clusters_score_near_one_and_mixed_ones_near_zero() {
        let (p, l) = blobs(1.0);
        let tight = cluster_quality("tight", &p, &l).unwrap();
        assert!(
            tight.silhouette > 0.9 && tight.intra_inter_ratio < 0.1,
            "{tight:?}"
        );
        let (p, l) = blobs(200.0);
        let loose = cluster_quality("loose", &p, &l).unwrap();
        assert!(
            loose.silhouette < tight.silhouette
                && loose.intra_inter_ratio > tight.intra_inter_ratio
        );
        // Labels unrelated to position: no structure.
        let shuffled: Vec<u32> = (0..30).map(|i| (i * 7 % 3) as u32).collect();
        let (p, _) = blobs(1.0);
        let none = cluster_quality("none", &p, &shuffled).unwrap();
        assert!(none.silhouette < 0.1, "{none:?}");
        assert!(cluster_quality("one", &p, &[0; 30]).is_err());
    }
}
