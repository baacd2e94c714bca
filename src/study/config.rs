//! `STUDY.toml`: what a study trains, on what, and how it measures the result. Every setting is
//! fixed in the file before any result exists; the study has no knob that reads its outcome.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::train::TrainConfig;
use crate::uncertainty::LossKind;

/// A study: arms × seeds of one training recipe, and the measures taken of each run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyConfig {
    /// The study's name; it lives in `output_dir/name/`.
    pub name: String,
    /// Where studies are written.
    #[serde(default = "default_output_dir")]
    pub output_dir: PathBuf,
    /// The losses compared: each arm is a value of `smoothing.loss` (`sft`, `ls`, `ual`);
    /// `sft` is the baseline every other arm is compared with.
    pub arms: Vec<LossKind>,
    /// Training seeds; every arm runs once per seed (at least 3 for a spread worth the name).
    pub seeds: Vec<u64>,
    /// A `ual train` configuration, shared by every run: each run sets only `name`,
    /// `output_dir`, `seed` and `smoothing.loss`.
    pub train: toml::Value,
    /// The measures.
    pub eval: EvalConfig,
    /// The judge of open-ended answers; without an endpoint the report says "not judged".
    #[serde(default)]
    pub judge: JudgeConfig,
}

fn default_output_dir() -> PathBuf {
    "runs/studies".into()
}

/// How every run is measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// The low-entropy split: training-schema lines with one correct answer, graded by exact
    /// match of the final number (`#### N`, else the last number).
    pub low_entropy: PathBuf,
    /// The high-entropy split: training-schema lines with a `references` array of acceptable
    /// answers, none of them seen in training.
    pub high_entropy: PathBuf,
    /// The longest answer generated.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Sampled answers per high-entropy prompt, for diversity.
    #[serde(default = "default_samples")]
    pub samples: usize,
    /// The sampling temperature of those answers.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Their nucleus.
    #[serde(default = "default_top_p")]
    pub top_p: f64,
    /// Their seed: answer j of prompt i draws from `seed + i · samples + j`.
    #[serde(default)]
    pub seed: u64,
    /// Confidence bins of the expected calibration error.
    #[serde(default = "default_bins")]
    pub ece_bins: usize,
    /// Whether to run the authors' clustering analysis (all-pairs PCA silhouette) over both
    /// splits' prompts.
    #[serde(default = "default_true")]
    pub clustering: bool,
}

fn default_max_new_tokens() -> usize {
    64
}
fn default_samples() -> usize {
    4
}
fn default_temperature() -> f64 {
    1.0
}
fn default_top_p() -> f64 {
    0.95
}
fn default_bins() -> usize {
    10
}
fn default_true() -> bool {
    true
}

/// The judge of each arm's open-ended answers against SFT's (`ual eval judge`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeConfig {
    /// An OpenAI-compatible server; empty: no judging.
    #[serde(default)]
    pub endpoint: String,
    /// The model it serves.
    #[serde(default)]
    pub model: String,
    /// The environment variable holding the API key.
    #[serde(default = "default_key_env")]
    pub api_key_env: String,
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// A judge prompt file; default: the authors' LIMA comparison.
    #[serde(default)]
    pub prompt: Option<PathBuf>,
}

fn default_key_env() -> String {
    "OPENAI_API_KEY".into()
}
fn default_concurrency() -> usize {
    4
}

impl StudyConfig {
    /// Reads and checks `path`; errors name the file and the key.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let config: Self =
            toml::from_str(&text).with_context(|| format!("{}: invalid study", path.display()))?;
        config
            .validate()
            .with_context(|| format!("{}: invalid study", path.display()))?;
        // Every run's configuration must resolve before the first one trains.
        for arm in &config.arms {
            config.run_config(*arm, config.seeds[0])?;
        }
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        if !self.arms.contains(&LossKind::Sft) {
            bail!("`arms` must include \"sft\", the baseline every other arm is compared with");
        }
        let mut arms = self.arms.clone();
        arms.sort_by_key(|a| format!("{a:?}"));
        arms.dedup();
        if arms.len() != self.arms.len() {
            bail!("`arms` names an arm twice");
        }
        if self.seeds.is_empty() {
            bail!("`seeds` is empty");
        }
        let mut seeds = self.seeds.clone();
        seeds.sort();
        seeds.dedup();
        if seeds.len() != self.seeds.len() {
            bail!("`seeds` names a seed twice");
        }
        if !self.train.is_table() {
            bail!("`train` must be a table of `ual train` keys");
        }
        for key in ["name", "output_dir", "seed"] {
            if self.train.get(key).is_some() {
                bail!("`train.{key}` is set by the study for each run; remove it");
            }
        }
        if self.eval.ece_bins == 0 {
            bail!("`eval.ece_bins` must be at least 1");
        }
        if !(self.eval.temperature > 0.0 && self.eval.temperature.is_finite()) {
            bail!("`eval.temperature` must be above 0 (diversity is measured on sampled answers)");
        }
        if !(self.eval.top_p > 0.0 && self.eval.top_p <= 1.0) {
            bail!("`eval.top_p` must be in (0, 1]");
        }
        if !self.judge.endpoint.is_empty() && self.judge.model.is_empty() {
            bail!("`judge.model` is needed with `judge.endpoint`");
        }
        Ok(())
    }

    /// The study's directory.
    pub fn dir(&self) -> PathBuf {
        self.output_dir.join(&self.name)
    }

    /// The name of one arm's run with one seed.
    pub fn run_name(arm: LossKind, seed: u64) -> String {
        format!("{}-seed{seed}", arm_name(arm))
    }

    /// The training configuration of one arm with one seed.
    pub fn run_config(&self, arm: LossKind, seed: u64) -> Result<TrainConfig> {
        let overrides = [
            format!("name={}", Self::run_name(arm, seed)),
            format!(
                "output_dir={:?}",
                self.dir().join("runs").display().to_string()
            ),
            format!("seed={seed}"),
            format!("smoothing.loss={:?}", arm_name(arm)),
        ];
        TrainConfig::from_table(Some((self.train.clone(), "[train]".into())), &overrides)
            .with_context(|| format!("study {:?}, arm {}", self.name, arm_name(arm)))
    }
}

/// An arm's name as the study writes it.
pub fn arm_name(arm: LossKind) -> &'static str {
    match arm {
        LossKind::Sft => "sft",
        LossKind::Ls => "ls",
        LossKind::Ual => "ual",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundled_miniature_loads_with_every_run_resolved() {
        let study = StudyConfig::load(Path::new("studies/mixed-tiny.toml")).unwrap();
        assert_eq!(study.arms, [LossKind::Sft, LossKind::Ls, LossKind::Ual]);
        assert!(study.seeds.len() >= 3);
        assert!(
            study.judge.endpoint.is_empty(),
            "the miniature is not judged"
        );
        let ls = study.run_config(LossKind::Ls, 2).unwrap();
        assert_eq!((ls.name.as_str(), ls.seed), ("ls-seed2", 2));
        assert_eq!(ls.smoothing.eps_fixed, 0.1);
        assert_eq!(
            ls.run_dir(),
            Path::new("studies/results/mixed-tiny/runs/ls-seed2")
        );
    }

    #[test]
    fn the_7b_study_names_only_keys_ual_train_knows() {
        let text = std::fs::read_to_string("studies/mixed-7b.toml").unwrap();
        let study: StudyConfig = toml::from_str(&text).unwrap();
        study.validate().unwrap();
        assert!(!study.judge.endpoint.is_empty());
        // Its model and data are the user's; with stand-ins every other key must resolve.
        let stand_ins = [
            "model=models/tiny".to_string(),
            "train_data=studies/data/mixed-tiny/train.jsonl".to_string(),
            "smoothing.loss=ual".to_string(),
        ];
        let train =
            TrainConfig::from_table(Some((study.train.clone(), "7b".into())), &stand_ins).unwrap();
        assert_eq!((train.lora.r, train.max_seq_len), (8, 1024));
    }

    #[test]
    fn a_study_without_its_baseline_or_with_run_keys_is_refused() {
        let base = std::fs::read_to_string("studies/mixed-tiny.toml").unwrap();
        let no_sft = base.replace(r#"arms = ["sft", "ls", "ual"]"#, r#"arms = ["ls", "ual"]"#);
        let study: StudyConfig = toml::from_str(&no_sft).unwrap();
        assert!(study.validate().unwrap_err().to_string().contains("sft"));
        let seeded = base.replace("[train]\n", "[train]\nseed = 3\n");
        let study: StudyConfig = toml::from_str(&seeded).unwrap();
        assert!(
            study
                .validate()
                .unwrap_err()
                .to_string()
                .contains("train.seed")
        );
    }
}
