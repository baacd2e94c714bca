//! The training configuration: TOML, overridable with `--set key=value`, validated up front.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::data::batch::Reduction;
use crate::data::batch::{LossOn, Overflow, SampleRules};
use crate::data::template::TemplateKind;
use crate::device::DeviceSpec;
use crate::model::lora::LoraConfig;
use crate::model::precision::{BaseDtype, Dtypes, Precision};
use crate::uncertainty::SmoothingConfig;

/// What trains: LoRA adapters on a frozen model, or every weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Adapters on the attention and MLP projections; the base stays frozen.
    #[default]
    Lora,
    /// Every weight.
    Full,
}

/// What the backward pass recomputes instead of keeping from the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Keep every activation the backward pass needs.
    #[default]
    Off,
    /// Recompute memory-bound activations (norms, activations, softmax): burn's balanced
    /// strategy. Little memory saved; no constraint on the model.
    Ops,
    /// Keep only each decoder layer's input; recompute one layer at a time in the backward pass
    /// (`train::recompute`). One extra forward pass; activation memory of a single layer.
    Layers,
}

impl Recompute {
    /// The autodiff device this strategy trains on.
    pub fn autodiff_device(self, device: &burn::tensor::Device) -> burn::tensor::Device {
        match self {
            Recompute::Ops => device.clone().autodiff().gradient_checkpointing(),
            Recompute::Off | Recompute::Layers => device.clone().autodiff(),
        }
    }
}

/// `true`/`false` (layers/off, as Hugging Face's switch) or one of the names.
impl<'de> Deserialize<'de> for Recompute {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Switch(bool),
            Name(String),
        }
        match Raw::deserialize(d)? {
            Raw::Switch(on) => Ok(if on { Self::Layers } else { Self::Off }),
            Raw::Name(name) => name.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl std::str::FromStr for Recompute {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" | "false" => Ok(Self::Off),
            "ops" => Ok(Self::Ops),
            "layers" | "true" => Ok(Self::Layers),
            other => Err(format!(
                "gradient_checkpointing = \"{other}\": expected \"off\", \"ops\" or \"layers\""
            )),
        }
    }
}

/// The learning rate after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Cosine decay to `lr · min_lr_ratio` at the last step.
    #[default]
    Cosine,
    /// `lr` until the end (the authors' intended schedule).
    Constant,
}

/// How micro-batches are drawn from the training set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Sampling {
    /// Length-bucketed batches in a seeded shuffle, epoch after epoch.
    #[default]
    Shuffle,
    /// Each micro-batch drawn uniformly with replacement (the authors' `torch.randint`).
    Replacement,
}

/// AdamW, the schedule and clipping. Defaults are PyTorch's AdamW (eps 1e-8) with no decay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// The peak learning rate: 2e-3 for the bundled tiny model; unset, another model gets
    /// 2e-4 (LoRA) or 2e-5 (full).
    pub lr: f64,
    /// AdamW's β₁ (first-moment decay).
    pub beta1: f64,
    /// AdamW's β₂ (second-moment decay).
    pub beta2: f64,
    /// AdamW's ε (added to the root of the second moment).
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// The learning rate after warm-up.
    pub schedule: Schedule,
    /// Steps of linear warm-up from 0 to `lr`.
    pub warmup_steps: usize,
    /// Warm-up as a fraction of the run's steps; when above 0 it replaces `warmup_steps`.
    pub warmup_ratio: f64,
    /// The cosine decay ends at `lr * min_lr_ratio` on the last step.
    pub min_lr_ratio: f64,
    /// Global gradient-norm clipping, as torch's `clip_grad_norm_`; 0 turns it off.
    pub max_grad_norm: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 2e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            schedule: Schedule::Cosine,
            warmup_steps: 5,
            warmup_ratio: 0.0,
            min_lr_ratio: 0.1,
            max_grad_norm: 1.0,
        }
    }
}

impl OptimConfig {
    /// Refuses settings AdamW cannot step with, naming the key: a positive finite `lr`,
    /// `beta1, beta2` in [0, 1), `eps > 0`, `weight_decay ≥ 0`, `max_grad_norm ≥ 0`,
    /// `min_lr_ratio` in [0, 1] and `warmup_ratio` in [0, 1).
    pub fn validate(&self) -> Result<()> {
        let finite = |v: f64| v.is_finite();
        let checks: [(&str, f64, bool, &str); 8] = [
            (
                "lr",
                self.lr,
                finite(self.lr) && self.lr > 0.0,
                "a positive number",
            ),
            (
                "beta1",
                self.beta1,
                (0.0..1.0).contains(&self.beta1),
                "in [0, 1)",
            ),
            (
                "beta2",
                self.beta2,
                (0.0..1.0).contains(&self.beta2),
                "in [0, 1)",
            ),
            (
                "eps",
                self.eps,
                finite(self.eps) && self.eps > 0.0,
                "a positive number",
            ),
            (
                "weight_decay",
                self.weight_decay,
                finite(self.weight_decay) && self.weight_decay >= 0.0,
                "≥ 0",
            ),
            (
                "max_grad_norm",
                self.max_grad_norm,
                finite(self.max_grad_norm) && self.max_grad_norm >= 0.0,
                "≥ 0 (0: no clipping)",
            ),
            (
                "min_lr_ratio",
                self.min_lr_ratio,
                (0.0..=1.0).contains(&self.min_lr_ratio),
                "in [0, 1]",
            ),
            (
                "warmup_ratio",
                self.warmup_ratio,
                (0.0..1.0).contains(&self.warmup_ratio),
                "in [0, 1)",
            ),
        ];
        match checks.iter().find(|c| !c.2) {
            Some((key, value, _, wanted)) => bail!("`optim.{key}` = {value} must be {wanted}"),
            None => Ok(()),
        }
    }
}

/// A training run: everything `ual train` reads from TOML and `--set`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// The run's directory is `runs/<name>`.
    pub name: String,
    /// The model trained: a Hugging Face directory or a GGUF file.
    pub model: PathBuf,
    /// Training JSONL (Alpaca, chat, ShareGPT or prompt/completion lines).
    pub train_data: PathBuf,
    /// Held-out JSONL; `""` means none. Unset, it is the bundled held-out set when
    /// `train_data` is the bundled training set, and none otherwise.
    pub eval_data: Option<PathBuf>,
    /// Where run directories are made.
    pub output_dir: PathBuf,
    /// `auto`, `cpu`, `wgpu` or `wgpu:N`.
    pub device: DeviceSpec,
    /// Seeds the adapters' initialisation, the batch order and dropout.
    pub seed: u64,
    /// LoRA or full fine-tuning.
    pub mode: Mode,
    /// Optimizer steps (unless `epochs` is set).
    pub steps: usize,
    /// Passes over the training set; when above 0 it sets `steps` (rounded up) from the number
    /// of samples, `batch_size` and `grad_accum`.
    pub epochs: f64,
    /// How micro-batches are drawn.
    pub sampling: Sampling,
    /// Samples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Samples longer than this are cut or dropped (`overflow`).
    pub max_seq_len: usize,
    /// What happens to a sample longer than `max_seq_len`.
    pub overflow: Overflow,
    /// How Alpaca and chat examples become text: `alpaca`, the model's `chat_template`, or the
    /// authors' `vicuna` / `vicuna_lima`.
    pub template: TemplateKind,
    /// Which tokens carry loss: `response` (ual's) or `all` but padding (the authors').
    pub loss_on: LossOn,
    /// `tokens`: the mean over the step's loss tokens (ual's); `samples`: each sample's mean,
    /// then the mean over samples (the authors').
    pub reduction: Reduction,
    /// Evaluate on `eval_data` every this many steps (and after the last); 0 only after the last.
    pub eval_every: usize,
    /// Checkpoint every this many steps; 0 never.
    pub checkpoint_every: usize,
    /// LoRA only: start from this PEFT adapter's factors instead of fresh ones; its `r`,
    /// `lora_alpha` and `target_modules` must equal `lora`'s.
    pub init_adapter: Option<PathBuf>,
    /// Keep the adapter (or model) of the lowest held-out NLL so far in `best/`. The NLL, not
    /// the UAL loss: its floor does not move with ε.
    pub keep_best: bool,
    /// Stop after this many evaluations in a row without a lower held-out NLL; 0 never stops
    /// early.
    pub early_stop_patience: usize,
    /// Also write the metrics as a TensorBoard event file, `events.out.tfevents.ual`.
    pub tensorboard: bool,
    /// Full fine-tuning writes `model/` in this dtype (float32, float16, bfloat16); unset means
    /// the base checkpoint's.
    pub export_dtype: Option<String>,
    /// The LM head and the loss as one fused operation in row blocks (`loss::linear`), so the
    /// `[tokens, vocab]` logits never exist. Off computes the logits, then the fused loss.
    pub fused_head: bool,
    /// Rows per block of the fused head; 0 picks about 8 Mi logits in whole 128-row tiles.
    /// Larger blocks cost memory and, on big GPUs, save time (`BENCHMARKS.md`).
    pub head_block_rows: usize,
    /// Vocabulary slices of the fused head's hidden gradient (split-K), so that a block's
    /// `[rows, H]` gradient keeps a large GPU busy; 0 picks them on hardware GPUs and uses none
    /// on CPUs, 1 turns the split off.
    pub head_vocab_splits: usize,
    /// What the backward pass recomputes: `"off"`, `"ops"` or `"layers"` (`true` = layers).
    pub gradient_checkpointing: Recompute,
    /// LoRA only: store the frozen projection weights as `f32` (that is, in the compute type),
    /// `f16` (wgpu adapters with SHADER_F16), or quantized at load into llama.cpp's `q8_0` or
    /// `q4_0` blocks (QLoRA). Adapters, the loss and optimizer state stay f32.
    pub base_dtype: BaseDtype,
    /// LoRA only: what the decoder computes in, `"f32"`, `"f16"` (with a dynamic loss scale)
    /// or `"bf16"`: frozen weights, activations and matmul inputs in that type; adapters, their
    /// gradients, optimizer state, norms' statistics, the head and the loss in f32
    /// (`model::precision`).
    pub precision: Precision,
    /// AdamW, the schedule and clipping.
    pub optim: OptimConfig,
    /// LoRA's rank, scale, dropout and targets.
    pub lora: LoraConfig,
    /// How each sample's uncertainty becomes its ε.
    pub smoothing: SmoothingConfig,
}

impl Default for TrainConfig {
    /// The bundled run: UAL-LoRA on the tiny model and its mixed dataset.
    fn default() -> Self {
        Self {
            name: "tiny-ual".into(),
            model: "models/tiny".into(),
            train_data: "models/tiny/data/train.jsonl".into(),
            eval_data: Some("models/tiny/data/eval.jsonl".into()),
            output_dir: "runs".into(),
            device: DeviceSpec::Auto,
            seed: 42,
            mode: Mode::Lora,
            steps: 60,
            epochs: 0.0,
            sampling: Sampling::Shuffle,
            batch_size: 8,
            grad_accum: 1,
            max_seq_len: 384,
            overflow: Overflow::Truncate,
            template: TemplateKind::Auto,
            loss_on: LossOn::Response,
            reduction: Reduction::Tokens,
            eval_every: 10,
            checkpoint_every: 20,
            init_adapter: None,
            keep_best: true,
            early_stop_patience: 0,
            tensorboard: true,
            export_dtype: None,
            fused_head: true,
            head_block_rows: 0,
            head_vocab_splits: 0,
            gradient_checkpointing: Recompute::Off,
            base_dtype: BaseDtype::F32,
            precision: Precision::F32,
            optim: OptimConfig::default(),
            lora: LoraConfig::default(),
            smoothing: SmoothingConfig::default(),
        }
    }
}

/// Which keys the user gave, where a default depends on it.
#[derive(Clone, Copy)]
struct Given {
    eval_data: bool,
    lr: bool,
}

/// The learning rate of LoRA on a model other than the bundled one: PEFT's and TRL's usual
/// rate, and near the authors' 3e-4 for 7B models. On SmolLM2-135M, rates up to 2e-3 converge
/// faster (`BENCHMARKS.md`), but the default must not diverge on the paper's 7B setting.
pub const LORA_LR: f64 = 2e-4;

/// The learning rate of full fine-tuning on a model other than the bundled one (TRL's
/// `SFTConfig` default).
pub const FULL_LR: f64 = 2e-5;

/// The keys `--resume` may override: the run's length, its evaluation and checkpoint cadence,
/// and the device and memory levers, none of which changes what the checkpoint's weights and
/// optimizer state mean.
pub const RESUMABLE: [&str; 14] = [
    "steps",
    "epochs",
    "eval_every",
    "checkpoint_every",
    "keep_best",
    "early_stop_patience",
    "tensorboard",
    "eval_data",
    "device",
    "fused_head",
    "head_block_rows",
    "head_vocab_splits",
    "gradient_checkpointing",
    // Only so that the same global batch can resume on another number of ranks: the session
    // refuses a batch size that changes it.
    "batch_size",
];

impl TrainConfig {
    /// Defaults, then `file`, then each `key=value` override in order.
    pub fn resolve(file: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let user = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                let user: toml::Value = toml::from_str(&text)
                    .with_context(|| format!("{}: invalid TOML", path.display()))?;
                Some((user, path.display().to_string()))
            }
            None => None,
        };
        Self::from_table(user, overrides)
    }

    /// Defaults, then `user` (a parsed configuration and where it came from, for errors), then
    /// each `key=value` override in order.
    pub fn from_table(user: Option<(toml::Value, String)>, overrides: &[String]) -> Result<Self> {
        let mut tree = toml::Value::try_from(Self::default())?;
        let given = |key: &str| {
            let (section, field) = key.split_once('.').unwrap_or(("", key));
            let in_file = user.as_ref().is_some_and(|(u, _)| match section {
                "" => u.get(field).is_some(),
                s => u.get(s).and_then(|t| t.get(field)).is_some(),
            });
            let overridden = overrides
                .iter()
                .any(|o| o.split_once('=').is_some_and(|(k, _)| k.trim() == key));
            in_file || overridden
        };
        let given = Given {
            eval_data: given("eval_data"),
            lr: given("optim.lr"),
        };
        let source = user
            .as_ref()
            .map_or_else(|| "--set".to_string(), |(_, s)| s.clone());
        if let Some((user, _)) = user {
            merge(&mut tree, user);
        }
        let from_file = tree.clone();
        for o in overrides {
            let (key, value) = o
                .split_once('=')
                .with_context(|| format!("--set {o}: expected key=value"))?;
            set(&mut tree, key.trim(), parse_value(value.trim()))
                .with_context(|| format!("--set {o}"))?;
        }
        match Self::from_tree(tree, given) {
            Ok(config) => Ok(config),
            // The file alone is fine, so the overrides made it wrong: say so, not the file.
            Err(e) if !overrides.is_empty() && Self::from_tree(from_file, given).is_ok() => {
                let given: Vec<String> = overrides.iter().map(|o| format!("--set {o}")).collect();
                Err(anyhow::anyhow!("{}: {e:#}", given.join(" ")))
            }
            Err(e) => Err(anyhow::anyhow!("{source}: {e:#}")),
        }
    }

    /// The configuration a merged tree describes, checked.
    fn from_tree(tree: toml::Value, given: Given) -> Result<Self> {
        let mut config: Self = tree
            .try_into()
            .map_err(|e: toml::de::Error| anyhow::anyhow!("{}", with_suggestion(&e.to_string())))?;
        // TOML has no null: an empty path is how a file says "none". The bundled held-out set
        // belongs to the bundled training set: other data is not evaluated on it unasked.
        let defaults = Self::default();
        if config
            .eval_data
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
            || (!given.eval_data && config.train_data != defaults.train_data)
        {
            config.eval_data = None;
        }
        // Likewise the bundled run's learning rate belongs to the bundled tiny model.
        if !given.lr && !same_path(&config.model, &defaults.model) {
            config.optim.lr = match config.mode {
                Mode::Lora => LORA_LR,
                Mode::Full => FULL_LR,
            };
        }
        if config
            .init_adapter
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            config.init_adapter = None;
        }
        config.validate().context("invalid configuration")?;
        Ok(config)
    }

    /// The configuration of the run in `run_dir` (its `config.toml`), with `overrides` applied,
    /// pointed at `run_dir` even if the run was moved.
    pub fn for_resume(run_dir: &Path, overrides: &[String]) -> Result<Self> {
        let file = run_dir.join("config.toml");
        for o in overrides {
            let key = o.split_once('=').map_or(o.as_str(), |(k, _)| k).trim();
            if !RESUMABLE.contains(&key) {
                bail!(
                    "--set {o}: `{key}` cannot change on --resume (the checkpoint was made with the run's value); keys that can: {}",
                    RESUMABLE.join(", ")
                );
            }
        }
        let user = (read_run_config(&file)?, file.display().to_string());
        let mut config = Self::from_table(Some(user), overrides)?;
        config.name = run_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or(config.name);
        config.output_dir = run_dir.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(config)
    }

    /// Refuses settings that cannot train, naming the key.
    pub fn validate(&self) -> Result<()> {
        let plain_name = !self.name.is_empty()
            && !matches!(self.name.as_str(), "." | "..")
            && !self.name.contains(['/', '\\']);
        if !plain_name {
            bail!(
                "`name` = {:?} must be a plain directory name (no '/', '\\', \".\" or \"..\"): the run lives in output_dir/name",
                self.name
            );
        }
        for (name, path) in [("model", &self.model), ("train_data", &self.train_data)] {
            if path.as_os_str().is_empty() {
                bail!("`{name}` is not set: add --set {name}=PATH");
            }
        }
        for (name, v) in [
            ("steps", self.steps),
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
        ] {
            if v == 0 {
                bail!("`{name}` must be positive");
            }
        }
        if self.max_seq_len < 2 {
            bail!("`max_seq_len` must be at least 2");
        }
        self.optim.validate()?;
        if !(self.epochs >= 0.0 && self.epochs.is_finite()) {
            bail!(
                "`epochs` = {} must be 0 (use `steps`) or positive",
                self.epochs
            );
        }
        if self.mode == Mode::Lora {
            self.lora.validate()?;
        } else if let Some(dir) = &self.init_adapter {
            bail!(
                "`init_adapter` = {} needs mode = \"lora\"; to fine-tune a model with an adapter merged into it, run `ual merge` first",
                dir.display()
            );
        }
        if self.early_stop_patience > 0 && (self.eval_data.is_none() || self.eval_every == 0) {
            bail!(
                "`early_stop_patience` = {} counts evaluations during the run: set eval_data and eval_every > 0",
                self.early_stop_patience
            );
        }
        self.smoothing.validate()?;
        if self.gradient_checkpointing == Recompute::Layers
            && self.mode == Mode::Lora
            && self.lora.dropout > 0.0
        {
            // The recomputed layer would draw new dropout masks, and its gradient would belong
            // to a different function than the forward pass that produced the loss.
            bail!(
                "`gradient_checkpointing = \"layers\"` needs `lora.dropout = 0` (it is {}); use \"ops\" with dropout",
                self.lora.dropout
            );
        }
        if self.precision != Precision::F32 && self.mode == Mode::Full {
            bail!(
                "`precision = \"{}\"` needs mode = \"lora\": full fine-tuning would train half-precision weights (ual keeps no f32 master copy)",
                self.precision
            );
        }
        if self.base_dtype.is_reduced() && self.mode == Mode::Full {
            bail!(
                "`base_dtype = \"{}\"` needs mode = \"lora\": full fine-tuning trains the base weights",
                self.base_dtype
            );
        }
        Ok(())
    }

    /// The frozen base's storage and the compute type, for `model::precision`.
    pub fn dtypes(&self) -> Dtypes {
        Dtypes {
            base: self.base_dtype,
            precision: self.precision,
        }
    }

    /// The configuration as `config.toml` holds it, for `--resume` to read back. No held-out
    /// set is written as "", since TOML has no null and a missing key would resume with the
    /// default one.
    pub fn to_toml(&self) -> Result<String> {
        let mut written = self.clone();
        written.eval_data.get_or_insert_with(PathBuf::new);
        Ok(toml::to_string_pretty(&written)?)
    }

    /// `output_dir/name`.
    pub fn run_dir(&self) -> PathBuf {
        self.output_dir.join(&self.name)
    }

    /// How this run turns examples into samples, for a model whose logits are `vocab` wide.
    pub fn sample_rules(&self, vocab: usize) -> SampleRules {
        SampleRules {
            max_seq_len: self.max_seq_len,
            overflow: self.overflow,
            loss_on: self.loss_on,
            smoothing: self.smoothing.clone(),
            vocab,
        }
    }

    /// Optimizer steps for `samples` training samples on one rank: `steps`, or `epochs` passes.
    pub fn total_steps(&self, samples: usize) -> usize {
        self.total_steps_on(samples, 1)
    }

    /// [`TrainConfig::total_steps`] for `ranks` ranks, each taking `batch_size` samples per
    /// micro-batch.
    pub fn total_steps_on(&self, samples: usize, ranks: usize) -> usize {
        if self.epochs <= 0.0 {
            return self.steps;
        }
        let per_step = (self.batch_size * self.grad_accum * ranks.max(1)) as f64;
        ((self.epochs * samples as f64 / per_step).ceil() as usize).max(1)
    }

    /// Warm-up steps of a run of `total_steps`.
    pub fn warmup_steps(&self, total_steps: usize) -> usize {
        if self.optim.warmup_ratio > 0.0 {
            (self.optim.warmup_ratio * total_steps as f64).round() as usize
        } else {
            self.optim.warmup_steps
        }
    }
}

/// A run's `config.toml`, read by rank 0 and sent to the others, which need not see the run
/// directory (two machines without a shared filesystem).
fn read_run_config(file: &Path) -> Result<toml::Value> {
    let cluster = crate::cluster::world();
    let read = || -> Result<String> {
        let dir = file.parent().unwrap_or(Path::new("."));
        if !file.exists() {
            bail!(
                "{}: not a ual run directory (no config.toml)",
                dir.display()
            );
        }
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))
    };
    let text = cluster.is_root().then(read).transpose();
    let mut bytes = cluster
        .agree(text, "reading the run's config.toml")?
        .unwrap_or_default()
        .into_bytes();
    cluster.broadcast(&mut bytes, "sending the run's config.toml");
    let text =
        String::from_utf8(bytes).with_context(|| format!("{}: not UTF-8", file.display()))?;
    toml::from_str(&text).with_context(|| format!("{}: invalid TOML", file.display()))
}

fn merge(base: &mut toml::Value, user: toml::Value) {
    match (base, user) {
        (toml::Value::Table(b), toml::Value::Table(u)) => {
            for (k, v) in u {
                match b.get_mut(&k) {
                    Some(existing) if existing.is_table() && v.is_table() => merge(existing, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, u) => *b = u,
    }
}

/// Whether `a` and `b` name the same file, however written.
fn same_path(a: &Path, b: &Path) -> bool {
    a == b
        || matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(a), Ok(b)) if a == b
        )
}

/// The known name nearest to `unknown`, if one is near: one contains the other (`max_steps`
/// → `steps`), or they are a few edits apart.
fn closest<'a>(unknown: &str, known: &[&'a str]) -> Option<&'a str> {
    let contains = known
        .iter()
        .filter(|k| k.len() >= 3 && (unknown.contains(**k) || k.contains(unknown)))
        .max_by_key(|k| k.len());
    contains.copied().or_else(|| {
        known
            .iter()
            .map(|k| (strsim::damerau_levenshtein(unknown, k), *k))
            .filter(|(d, k)| *d <= (k.len() / 3).max(2))
            .min()
            .map(|(_, k)| k)
    })
}

/// serde's "unknown variant `chatml`, expected one of `auto`, …\nin `template`" as one line,
/// with the nearest known value suggested.
fn with_suggestion(message: &str) -> String {
    let line = message.trim().replace("\nin ", " in ");
    let Some(rest) = line.strip_prefix("unknown variant `") else {
        return line;
    };
    let Some((given, rest)) = rest.split_once('`') else {
        return line;
    };
    let known: Vec<&str> = rest
        .split(" in ")
        .next()
        .unwrap_or_default()
        .split('`')
        .skip(1)
        .step_by(2)
        .collect();
    match closest(given, &known) {
        Some(near) => format!("{line}; did you mean `{near}`?"),
        None => line,
    }
}

fn parse_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

fn set(tree: &mut toml::Value, key: &str, value: toml::Value) -> Result<()> {
    let mut node = tree;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let table = node
            .as_table_mut()
            .with_context(|| format!("`{}` is not a section", parts[..i].join(".")))?;
        if i + 1 == parts.len() {
            if !table.contains_key(*part)
                && !matches!(*part, "eval_data" | "export_dtype" | "init_adapter")
            {
                let known: Vec<&str> = table.keys().map(String::as_str).collect();
                match closest(part, &known) {
                    Some(near) => bail!(
                        "unknown key `{key}`; did you mean `{}`?",
                        parts[..i]
                            .iter()
                            .chain([&near])
                            .copied()
                            .collect::<Vec<_>>()
                            .join(".")
                    ),
                    None => bail!("unknown key `{key}`; known here: {}", known.join(", ")),
                }
            }
            table.insert(part.to_string(), value);
            return Ok(());
        }
        node = table
            .get_mut(*part)
            .with_context(|| format!("unknown section `{}`", parts[..=i].join(".")))?;
    }
    unreachable!("split yields at least one part")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_in_order_and_unknown_keys_fail() {
        let c = TrainConfig::resolve(
            None,
            &[
                "optim.lr=0.01".into(),
                "smoothing.loss=sft".into(),
                "name=x".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.optim.lr, 0.01);
        assert_eq!(c.smoothing.loss, crate::uncertainty::LossKind::Sft);
        assert_eq!(c.name, "x");
        let err = TrainConfig::resolve(None, &["optim.lrr=1".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("optim.lrr"));
        assert!(
            format!("{err:#}").contains("did you mean `optim.lr`?"),
            "{err:#}"
        );
        let err = TrainConfig::resolve(None, &["max_steps=3".into()]).unwrap_err();
        assert!(
            format!("{err:#}").contains("did you mean `steps`?"),
            "{err:#}"
        );
        let err = TrainConfig::resolve(None, &["lora.rank=3".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("known here:"), "{err:#}");
        let err = TrainConfig::resolve(None, &["smoothing.loss=sfft".into()]).unwrap_err();
        assert!(
            format!("{err:#}").contains("did you mean `sft`?"),
            "{err:#}"
        );
        let err = TrainConfig::resolve(None, &["base_dtype=q4".into()]).unwrap_err();
        assert!(
            format!("{err:#}").contains("did you mean `q4_0`?")
                && !format!("{err:#}").contains('\n'),
            "{err:#}"
        );
        let err = TrainConfig::resolve(None, &["smoothing.eps_max=1.5".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("eps_max"));
    }

    #[test]
    fn early_stopping_needs_evaluations_during_the_run() {
        let refused = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            let err = TrainConfig::resolve(None, &sets).unwrap_err();
            assert!(format!("{err:#}").contains("eval_every > 0"), "{err:#}");
        };
        refused(&["early_stop_patience=2", "eval_every=0"]);
        refused(&["early_stop_patience=2", "eval_data=\"\""]);
        assert!(TrainConfig::resolve(None, &["early_stop_patience=2".into()]).is_ok());
    }

    /// The bundled run's learning rate stays with the bundled model; another model gets
    /// LoRA's (or full fine-tuning's) unless one is given.
    #[test]
    fn another_model_gets_a_real_models_learning_rate() {
        let lr = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            TrainConfig::resolve(None, &sets).unwrap().optim.lr
        };
        assert_eq!(lr(&[]), 2e-3);
        assert_eq!(lr(&["model=\"other\""]), LORA_LR);
        assert_eq!(lr(&["model=\"other\"", "mode=\"full\""]), FULL_LR);
        assert_eq!(lr(&["model=\"other\"", "optim.lr=1e-3"]), 1e-3);
    }

    #[test]
    fn a_bad_override_is_blamed_on_set_not_on_the_file() {
        let file = toml::Value::Table(toml::map::Map::from_iter([(
            "name".to_string(),
            toml::Value::String("x".into()),
        )]));
        let given = Some((file.clone(), "cfg/base.toml".to_string()));
        let err = TrainConfig::from_table(given, &["base_dtype=int8".into()]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.starts_with("--set base_dtype=int8") && !msg.contains("cfg/base.toml"),
            "{msg}"
        );
        let err = TrainConfig::from_table(
            Some((file, "cfg/base.toml".into())),
            &["lora.alpha=0".into()],
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").starts_with("--set lora.alpha=0"),
            "{err:#}"
        );
        // A file that is wrong on its own is still the file's fault.
        let bad = toml::Value::Table(toml::map::Map::from_iter([(
            "base_dtype".to_string(),
            toml::Value::String("int8".into()),
        )]));
        let err = TrainConfig::from_table(Some((bad, "cfg/base.toml".into())), &[]).unwrap_err();
        assert!(format!("{err:#}").starts_with("cfg/base.toml"), "{err:#}");
    }

    #[test]
    fn precision_is_a_lora_setting_with_three_values() {
        let resolve = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            TrainConfig::resolve(None, &sets)
        };
        assert_eq!(resolve(&[]).unwrap().precision, Precision::F32);
        assert_eq!(
            resolve(&["precision=bf16"]).unwrap().precision,
            Precision::Bf16
        );
        let err = format!("{:#}", resolve(&["precision=f8"]).unwrap_err());
        assert!(err.contains("precision"), "{err}");
        let err = format!(
            "{:#}",
            resolve(&["precision=f16", "mode=full"]).unwrap_err()
        );
        assert!(err.contains("needs mode = \"lora\""), "{err}");
        let err = format!(
            "{:#}",
            resolve(&["base_dtype=q4_0", "mode=full"]).unwrap_err()
        );
        assert!(err.contains("base_dtype = \"q4_0\""), "{err}");
    }

    #[test]
    fn checkpointing_takes_a_switch_or_a_name() {
        let strategy = |value: &str| {
            TrainConfig::resolve(None, &[format!("gradient_checkpointing={value}")])
                .map(|c| c.gradient_checkpointing)
        };
        assert_eq!(strategy("true").unwrap(), Recompute::Layers);
        assert_eq!(strategy("false").unwrap(), Recompute::Off);
        assert_eq!(strategy("ops").unwrap(), Recompute::Ops);
        assert_eq!(strategy("\"layers\"").unwrap(), Recompute::Layers);
        let err = format!("{:#}", strategy("all").unwrap_err());
        assert!(
            err.contains("expected \"off\", \"ops\" or \"layers\""),
            "{err}"
        );
        let err = TrainConfig::resolve(
            None,
            &[
                "gradient_checkpointing=layers".into(),
                "lora.dropout=0.1".into(),
            ],
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("lora.dropout = 0"), "{err:#}");
    }

    #[test]
    fn no_evaluation_is_expressible_and_survives_the_written_config() {
        let default = TrainConfig::resolve(None, &[]).unwrap();
        assert!(default.eval_data.is_some(), "the bundled run evaluates");
        let other = TrainConfig::resolve(None, &["train_data=\"mine.jsonl\"".into()]).unwrap();
        assert_eq!(
            other.eval_data, None,
            "other data is not evaluated on the bundled set"
        );
        let asked = [
            "train_data=\"mine.jsonl\"".into(),
            "eval_data=\"held.jsonl\"".into(),
        ];
        let asked = TrainConfig::resolve(None, &asked).unwrap();
        assert_eq!(asked.eval_data, Some(PathBuf::from("held.jsonl")));
        let none = TrainConfig::resolve(None, &["eval_data=\"\"".into()]).unwrap();
        assert_eq!(none.eval_data, None);
        // The run writes none as "" and `--resume` reads it back as none.
        let dir = tempfile_dir();
        let file = dir.join("config.toml");
        std::fs::write(&file, none.to_toml().unwrap()).unwrap();
        assert_eq!(
            TrainConfig::resolve(Some(&file), &[]).unwrap().eval_data,
            None
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ual-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
