//! The authors' clustering analysis (`benchmark/pca_cluster.py` and `pca_collect.py` in their
//! code; `UAL-PAPER.md`), which backs the paper's claim that UAL clusters tokens better:
//!
//! 1. run the model over template-wrapped prompts (no responses) and keep every position's
//!    final-norm hidden state, labelled with the id of the token that follows it;
//! 2. keep the 42 most frequent labels (ties: the label seen first), and all 861 pairs of them;
//! 3. for each pair, fit PCA to 2 dimensions on that pair's points alone, then take the
//!    Euclidean silhouette score of the two classes in that plane (sklearn's `PCA(2)` and
//!    `silhouette_score`);
//! 4. report every pair and the mean over all pairs.
//!
//! The authors' later scripts keep only the 100 pairs with the highest UAL/LS ratio; that
//! selection is not offered here, since it is chosen by the outcome it reports.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Result, anyhow, bail};
use burn::tensor::{Int, Tensor, TensorData};
use nalgebra::{DMatrix, SymmetricEigen};
use plotters::prelude::*;
use serde::Serialize;

use crate::model::Llama;

/// How many of the most frequent labels the authors keep.
pub const TOP_LABELS: usize = 42;

/// A label and how many points carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LabelCount {
    /// The token id.
    pub id: u32,
    /// How often it is the next token.
    pub count: usize,
}

/// The silhouette of one pair of labels; `None` when the pair has too few points for one
/// (sklearn needs at least three).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairScore {
    /// The first token id.
    pub a: u32,
    /// The second token id.
    pub b: u32,
    /// The pair's silhouette in its PCA plane; `None` when a class is empty.
    pub silhouette: Option<f64>,
}

/// One model's analysis.
#[derive(Debug, Clone, Serialize)]
pub struct Clustering {
    /// Which model: the base, or the base with an adapter.
    pub model: String,
    /// The most frequent next-token ids.
    pub labels: Vec<LabelCount>,
    /// Every pair of them, scored.
    pub pairs: Vec<PairScore>,
    /// The mean silhouette over every pair that has one.
    pub mean: f64,
}

/// The `k` most frequent labels, most frequent first; equal counts keep their first-seen order
/// (Python's stable sort over an insertion-ordered dict, as the authors count).
pub fn top_labels(labels: &[u32], k: usize) -> Vec<LabelCount> {
    let mut order: Vec<u32> = Vec::new();
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for &l in labels {
        let count = counts.entry(l).or_insert_with(|| {
            order.push(l);
            0
        });
        *count += 1;
    }
    let mut ranked: Vec<LabelCount> = order
        .into_iter()
        .map(|id| LabelCount {
            id,
            count: counts[&id],
        })
        .collect();
    ranked.sort_by_key(|l| std::cmp::Reverse(l.count));
    ranked.truncate(k);
    ranked
}

/// Every pair of `top` (in rank order) scored on `points`: PCA(2) fitted on the pair's points,
/// then their silhouette.
pub fn pair_scores(points: &[Vec<f32>], labels: &[u32], top: &[LabelCount]) -> Vec<PairScore> {
    let mut pairs = Vec::new();
    for (i, a) in top.iter().enumerate() {
        for b in &top[i + 1..] {
            let (plane, classes) = pair_plane(points, labels, a.id, b.id);
            pairs.push(PairScore {
                a: a.id,
                b: b.id,
                silhouette: silhouette(&plane, &classes),
            });
        }
    }
    pairs
}

/// The analysis of one model's features.
pub fn analyse(model: &str, points: &[Vec<f32>], labels: &[u32], k: usize) -> Clustering {
    let top = top_labels(labels, k);
    let pairs = pair_scores(points, labels, &top);
    let scored: Vec<f64> = pairs.iter().filter_map(|p| p.silhouette).collect();
    Clustering {
        model: model.to_string(),
        labels: top,
        mean: scored.iter().sum::<f64>() / scored.len().max(1) as f64,
        pairs,
    }
}

/// The pair's points in their own first two principal components, and each point's class
/// (false = `a`, true = `b`), in input order.
pub fn pair_plane(
    points: &[Vec<f32>],
    labels: &[u32],
    a: u32,
    b: u32,
) -> (Vec<[f64; 2]>, Vec<bool>) {
    let chosen: Vec<usize> = (0..labels.len())
        .filter(|&i| labels[i] == a || labels[i] == b)
        .collect();
    let rows: Vec<&[f32]> = chosen.iter().map(|&i| points[i].as_slice()).collect();
    let classes = chosen.iter().map(|&i| labels[i] == b).collect();
    (pca2(&rows), classes)
}

/// Scores on the first two principal components of `rows` (centred, as sklearn's PCA). The
/// eigenproblem is solved on the smaller of the covariance (d × d) and the Gram matrix (n × n),
/// which share their non-zero spectrum.
pub fn pca2(rows: &[&[f32]]) -> Vec<[f64; 2]> {
    let n = rows.len();
    let d = rows.first().map_or(0, |r| r.len());
    if n == 0 || d == 0 {
        return vec![[0.0; 2]; n];
    }
    let mut x = DMatrix::<f64>::from_fn(n, d, |i, j| rows[i][j] as f64);
    for j in 0..d {
        let mean = x.column(j).mean();
        x.column_mut(j).add_scalar_mut(-mean);
    }
    let components = 2.min(n).min(d);
    let mut scores = vec![[0.0; 2]; n];
    if n <= d {
        let eig = SymmetricEigen::new(&x * x.transpose());
        for (k, c) in largest(&eig.eigenvalues, components)
            .into_iter()
            .enumerate()
        {
            let scale = eig.eigenvalues[c].max(0.0).sqrt();
            for (i, s) in scores.iter_mut().enumerate() {
                s[k] = eig.eigenvectors[(i, c)] * scale;
            }
        }
    } else {
        let eig = SymmetricEigen::new(x.transpose() * &x);
        for (k, c) in largest(&eig.eigenvalues, components)
            .into_iter()
            .enumerate()
        {
            let projected = &x * eig.eigenvectors.column(c);
            for (i, s) in scores.iter_mut().enumerate() {
                s[k] = projected[i];
            }
        }
    }
    scores
}

/// Indices of the `k` largest eigenvalues, largest first.
fn largest(values: &nalgebra::DVector<f64>, k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&i, &j| values[j].total_cmp(&values[i]));
    order.truncate(k);
    order
}

/// sklearn's `silhouette_score` with two classes and Euclidean distance: per point
/// s = (b − a) / max(a, b), a the mean distance to its own class (itself excluded), b to the
/// other; 0 for a point alone in its class. `None` unless 3 ≤ n and both classes are present.
pub fn silhouette(points: &[[f64; 2]], classes: &[bool]) -> Option<f64> {
    let n = points.len();
    let in_b = classes.iter().filter(|&&c| c).count();
    if n < 3 || in_b == 0 || in_b == n {
        return None;
    }
    let size = |c: bool| if c { in_b } else { n - in_b };
    let mut total = 0.0;
    for i in 0..n {
        let (mut own, mut other) = (0.0, 0.0);
        for j in 0..n {
            let d = ((points[i][0] - points[j][0]).powi(2) + (points[i][1] - points[j][1]).powi(2))
                .sqrt();
            if classes[j] == classes[i] {
                own += d;
            } else {
                other += d;
            }
        }
        let same = size(classes[i]);
        if same == 1 {
            continue;
        }
        let a = own / (same - 1) as f64;
        let b = other / size(!classes[i]) as f64;
        let m = a.max(b);
        if m > 0.0 {
            total += (b - a) / m;
        }
    }
    Some(total / n as f64)
}

/// Every position's final-norm hidden state, labelled with the next token's id, for the
/// positions whose label is in `keep` (all positions when `keep` is `None`).
pub fn next_token_features(
    model: &Llama,
    sequences: &[Vec<u32>],
    keep: Option<&[u32]>,
    mut done: impl FnMut(),
) -> Result<(Vec<Vec<f32>>, Vec<u32>)> {
    let device = model.device();
    let (mut points, mut labels) = (Vec::new(), Vec::new());
    for ids in sequences {
        let n = ids.len();
        if n >= 2 {
            let input = Tensor::<2, Int>::from_data(
                TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [1, n]),
                &device,
            );
            let hidden = model.hidden_states(input);
            let h = hidden.dims()[2];
            let values = hidden
                .reshape([n, h])
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .map_err(|e| anyhow!("{e:?}"))?;
            for (row, &next) in values.chunks_exact(h).zip(&ids[1..]) {
                if keep.is_none_or(|k| k.contains(&next)) {
                    points.push(row.to_vec());
                    labels.push(next);
                }
            }
        }
        done();
    }
    Ok((points, labels))
}

/// The 2-D scatter of one pair (its own PCA plane), one colour per label, as SVG.
pub fn plot_pair(
    points: &[Vec<f32>],
    labels: &[u32],
    (a, b): (u32, u32),
    names: (&str, &str),
    path: &Path,
) -> Result<()> {
    let (plane, classes) = pair_plane(points, labels, a, b);
    if !classes.contains(&true) || !classes.contains(&false) {
        bail!("--plot {a},{b}: both labels must occur among the features");
    }
    let range = |k: usize| {
        let (lo, hi) = plane.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
            (lo.min(p[k]), hi.max(p[k]))
        });
        let pad = ((hi - lo) * 0.05).max(1e-6);
        (lo - pad)..(hi + pad)
    };
    let root = SVGBackend::new(path, (640, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("tokens {a} ({}) vs {b} ({})", names.0, names.1),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(40)
        .build_cartesian_2d(range(0), range(1))
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("PC 1")
        .y_desc("PC 2")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (class, colour, name) in [(false, BLUE, names.0), (true, RED, names.1)] {
        chart
            .draw_series(
                plane
                    .iter()
                    .zip(&classes)
                    .filter(|(_, c)| **c == class)
                    .map(|(p, _)| Circle::new((p[0], p[1]), 3, colour.mix(0.6).filled())),
            )
            .map_err(|e| anyhow!("{e}"))?
            .label(name.to_string())
            .legend(move |(x, y)| Circle::new((x, y), 4, colour.filled()));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// What the authors' analysis runs on.
pub struct Request<'a> {
    /// The base model directory.
    pub model_dir: &'a Path,
    /// One analysis per entry: `None` is the base model.
    pub adapters: Vec<Option<&'a Path>>,
    /// How prompts are written.
    pub template: &'a crate::data::template::Template,
    /// Prompts as they are (BOS + text), without the template.
    pub raw: bool,
    /// The prompts.
    pub prompts: &'a [String],
    /// Prompts are cut to this many tokens.
    pub max_seq_len: usize,
    /// A pair to draw, and the directory its SVGs go to.
    pub plot: Option<((u32, u32), &'a Path)>,
    /// How the model is held on the device.
    pub types: crate::model::precision::Resolved,
}

/// The analysis of the base model and of each adapter, in order. Labels are counted from the
/// token ids (the same for every model), so only the top labels' features are kept.
pub fn analyse_models(request: &Request, device: &burn::tensor::Device) -> Result<Vec<Clustering>> {
    use crate::model::Pretrained;
    let mut results = Vec::new();
    for adapter in &request.adapters {
        let pretrained =
            Pretrained::load_with_adapter_as(request.model_dir, *adapter, device, request.types)?;
        let name = adapter.map_or("base".to_string(), |a| a.display().to_string());
        let prompts = Prompts {
            template: request.template,
            raw: request.raw,
            prompts: request.prompts,
            max_seq_len: request.max_seq_len,
        };
        let sequences = prompts.sequences(&pretrained.tokenizer)?;
        let progress =
            indicatif::ProgressBar::new(sequences.len() as u64).with_message(name.clone());
        let plot = request.plot.map(|(pair, _)| pair);
        let (top, points, labels) =
            top_features(&pretrained.model, &sequences, plot, || progress.inc(1))?;
        progress.finish_and_clear();
        if let Some(((a, b), dir)) = request.plot {
            let token = |id: u32| pretrained.tokenizer.token_text(id);
            let file = dir.join(format!("pair-{a}-{b}-{}.svg", results.len()));
            plot_pair(&points, &labels, (a, b), (&token(a), &token(b)), &file)?;
            eprintln!("{name}: wrote {}", file.display());
        }
        results.push(analyse_top(name, &top, &points, &labels));
    }
    Ok(results)
}

/// Prompts as the analysis feeds them to a model.
pub struct Prompts<'a> {
    /// How prompts are written.
    pub template: &'a crate::data::template::Template,
    /// Prompts as they are (BOS + text), without the template.
    pub raw: bool,
    /// The prompts.
    pub prompts: &'a [String],
    /// Prompts are cut to this many tokens.
    pub max_seq_len: usize,
}

impl Prompts<'_> {
    /// Each prompt's token ids.
    fn sequences(&self, tokenizer: &crate::model::Tokenizer) -> Result<Vec<Vec<u32>>> {
        use crate::data::formats::Message;
        self.prompts
            .iter()
            .map(|prompt| {
                let text = if self.raw {
                    prompt.clone()
                } else {
                    self.template.prompt(&[Message::new("user", prompt)])?
                };
                let special = self.raw || !self.template.prompt_has_special_tokens();
                let mut ids = tokenizer.encode_with(&text, special)?;
                ids.truncate(self.max_seq_len);
                Ok(ids)
            })
            .collect()
    }
}

/// One loaded model's analysis, calling `progress` after each prompt.
pub fn analyse_pretrained(
    pretrained: &crate::model::Pretrained,
    name: &str,
    prompts: &Prompts,
    progress: impl FnMut(),
) -> Result<Clustering> {
    let sequences = prompts.sequences(&pretrained.tokenizer)?;
    let (top, points, labels) = top_features(&pretrained.model, &sequences, None, progress)?;
    Ok(analyse_top(name.to_string(), &top, &points, &labels))
}

/// The most frequent labels and the labelled points kept for them.
type TopFeatures = (Vec<LabelCount>, Vec<Vec<f32>>, Vec<u32>);

/// The top labels of `sequences` and the features of the positions that carry them (and the
/// `extra` pair's, for a plot).
fn top_features(
    model: &crate::model::Llama,
    sequences: &[Vec<u32>],
    extra: Option<(u32, u32)>,
    progress: impl FnMut(),
) -> Result<TopFeatures> {
    let next: Vec<u32> = sequences
        .iter()
        .flat_map(|s| s.iter().skip(1).copied())
        .collect();
    let top = top_labels(&next, TOP_LABELS);
    let mut keep: Vec<u32> = top.iter().map(|l| l.id).collect();
    if let Some((a, b)) = extra {
        keep.extend([a, b]);
    }
    let (points, labels) = next_token_features(model, sequences, Some(&keep), progress)?;
    Ok((top, points, labels))
}

/// The analysis of the points whose label is among `top`.
fn analyse_top(
    name: String,
    top: &[LabelCount],
    points: &[Vec<f32>],
    labels: &[u32],
) -> Clustering {
    let top_ids: Vec<u32> = top.iter().map(|l| l.id).collect();
    let kept: Vec<usize> = (0..labels.len())
        .filter(|&i| top_ids.contains(&labels[i]))
        .collect();
    let points: Vec<Vec<f32>> = kept.iter().map(|&i| points[i].clone()).collect();
    let labels: Vec<u32> = kept.iter().map(|&i| labels[i]).collect();
    Clustering {
        model: name,
        labels: top.to_vec(),
        ..analyse("", &points, &labels, TOP_LABELS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_labels_break_ties_by_first_appearance() {
        let top = top_labels(&[5, 3, 3, 9, 5, 7, 9], 3);
        let ids: Vec<u32> = top.iter().map(|l| l.id).collect();
        assert_eq!(ids, [5, 3, 9]);
        assert_eq!(top[0].count, 2);
    }

    #[test]
    fn silhouette_of_two_tight_far_apart_classes_is_near_one() {
        let points = [[0.0, 0.0], [0.0, 0.1], [10.0, 0.0], [10.0, 0.1]];
        let s = silhouette(&points, &[false, false, true, true]).unwrap();
        assert!(s > 0.98, "{s}");
        assert_eq!(silhouette(&points[..2], &[false, true]), None);
    }

    #[test]
    fn pca_keeps_the_pairwise_geometry_of_planar_data() {
        // Points already in a plane of R^3: PCA(2) must preserve every distance.
        let rows: Vec<Vec<f32>> = [
            [0.0, 0.0, 1.0],
            [1.0, 2.0, 1.0],
            [3.0, -1.0, 1.0],
            [2.0, 2.0, 1.0],
        ]
        .iter()
        .map(|r| r.to_vec())
        .collect();
        let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
        let plane = pca2(&refs);
        let dist3 = |i: usize, j: usize| {
            (0..3)
                .map(|k| (rows[i][k] - rows[j][k]).powi(2) as f64)
                .sum::<f64>()
                .sqrt()
        };
        let dist2 = |i: usize, j: usize| {
            ((plane[i][0] - plane[j][0]).powi(2) + (plane[i][1] - plane[j][1]).powi(2)).sqrt()
        };
        for i in 0..4 {
            for j in 0..4 {
                assert!((dist3(i, j) - dist2(i, j)).abs() < 1e-9);
            }
        }
    }
}
