//! LoRA: a frozen projection plus a trainable low-rank update, x·W + (α/r)·(dropout(x)·A)·B.
//!
//! The dense update W + s·A·B is never formed, and W gets no gradient. Factors are kept in burn's
//! `[in, r]` / `[r, out]` layout and transposed to PEFT's `lora_A [r, in]` / `lora_B [out, r]` on
//! export; RoPE is rotate-half, so no q/k permutation needs undoing.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::module::{Module, Param};
use burn::nn::DropoutConfig;
use burn::tensor::{DType, Device, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::llama::{Llama, PROJECTIONS};
use super::load::SafetensorsFile;
use super::projection::{LoraAdapter, LoraLinear, param, stable_id};

/// The projections LoRA may target: PEFT's `target_modules` names, the last part of each of
/// [`PROJECTIONS`].
pub fn targets() -> Vec<&'static str> {
    PROJECTIONS
        .iter()
        .map(|p| p.rsplit('.').next().expect("a name"))
        .collect()
}

/// LoRA hyper-parameters, named as in PEFT's `LoraConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank of the update.
    pub r: usize,
    /// Scale numerator: the update is multiplied by α / r.
    pub alpha: f64,
    /// Dropout on the adapter's input while training.
    pub dropout: f64,
    /// PEFT's names of the projections that get adapters.
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: targets().into_iter().map(String::from).collect(),
        }
    }
}

impl LoraConfig {
    /// Refuses a rank of 0, dropout outside [0, 1) and unknown targets.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            bail!("lora.r must be positive");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("lora.dropout = {} is outside [0, 1)", self.dropout);
        }
        if self.target_modules.is_empty() {
            bail!(
                "lora.target_modules is empty; choose from {}",
                targets().join(", ")
            );
        }
        for t in &self.target_modules {
            if !targets().contains(&t.as_str()) {
                bail!(
                    "lora.target_modules: unknown module {t:?}; choose from {}",
                    targets().join(", ")
                );
            }
        }
        Ok(())
    }

    /// α / r.
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }
}

/// Freezes the base model and attaches fresh adapters with PEFT's initialisation: A
/// Kaiming-uniform (bound 1/√in), B zero, so training starts from the base model exactly.
///
/// A is drawn on the host from `seed` and the module's name, so a run starts from the same
/// adapters on every device and whatever else the process is doing with the device's RNG.
pub fn attach(model: Llama, config: &LoraConfig, seed: u64, device: &Device) -> Llama {
    let mut model = model.no_grad();
    for_each_target(&mut model, config, |name, proj| {
        let [d_in, d_out] = proj.dims();
        let bound = 1.0 / (d_in as f32).sqrt();
        let mut rng = StdRng::seed_from_u64(seed ^ stable_id(name));
        let values: Vec<f32> = (0..d_in * config.r)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let a = Tensor::from_data(TensorData::new(values, [d_in, config.r]), device);
        let b = Tensor::zeros([config.r, d_out], device);
        proj.lora = Some(adapter(name, a, b, config));
    });
    model
}

/// Stores the frozen weights of every decoder projection in `dtype` (f16 halves the base
/// model's memory); LoRA factors, norms, embeddings, the loss and optimizer state stay f32.
pub fn store_frozen_in(mut model: Llama, dtype: DType) -> Llama {
    fn frozen<const D: usize>(p: &Param<Tensor<D>>, dtype: DType) -> Param<Tensor<D>> {
        let mut converted = Param::from_tensor(p.val().cast(dtype)).set_require_grad(false);
        converted.id = p.id;
        converted
    }
    for_each_named(&mut model, |_, proj| {
        proj.base.weight = frozen(&proj.base.weight, dtype);
        proj.base.bias = proj.base.bias.as_ref().map(|b| frozen(b, dtype));
    });
    model
}

/// The model computing in `dtype` (a run's `precision`): the frozen projections stored in it
/// ([`store_frozen_in`]) and the residual stream, attention and the projections' products in
/// it too. The adapters, norms' statistics, embeddings, head and loss stay f32.
pub fn compute_in(model: Llama, dtype: DType) -> Llama {
    let mut model = match dtype {
        DType::F32 => model,
        _ => store_frozen_in(model, dtype),
    };
    model.activations = dtype;
    model
}

/// How a LoRA run stores the frozen projection weights (`base_dtype`). Adapters, the loss and
/// optimizer state stay f32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum BaseDtype {
    /// Full precision.
    #[default]
    #[serde(rename = "f32", alias = "float32")]
    F32,
    /// Half precision: half the base model's memory, on wgpu adapters with SHADER_F16 (the CPU
    /// runs it, more slowly than f32).
    #[serde(rename = "f16", alias = "float16")]
    F16,
}

impl std::str::FromStr for BaseDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            other => Err(format!(
                "base_dtype = \"{other}\": expected \"f32\" or \"f16\""
            )),
        }
    }
}

impl std::fmt::Display for BaseDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
        })
    }
}

impl BaseDtype {
    /// The tensor dtype, checked against the device: f16 needs SHADER_F16 on wgpu.
    pub fn dtype(self, shader_f16: bool, is_wgpu: bool) -> Result<DType> {
        match self {
            Self::F32 => Ok(DType::F32),
            Self::F16 if is_wgpu && !shader_f16 => {
                bail!("base_dtype = \"f16\": this adapter lacks SHADER_F16; use \"f32\"")
            }
            Self::F16 => Ok(DType::F16),
        }
    }
}

fn adapter(name: &str, a: Tensor<2>, b: Tensor<2>, config: &LoraConfig) -> LoraAdapter {
    LoraAdapter {
        a: param(&format!("{name}.lora_A.weight"), a),
        b: param(&format!("{name}.lora_B.weight"), b),
        dropout: DropoutConfig::new(config.dropout).init(),
        scale: config.scale(),
    }
}

/// Calls `f` on every targeted projection, with its PEFT module path.
fn for_each_target(
    model: &mut Llama,
    config: &LoraConfig,
    mut f: impl FnMut(&str, &mut LoraLinear),
) {
    for_each_named(model, |name, proj| {
        if config
            .target_modules
            .iter()
            .any(|t| name.ends_with(t.as_str()))
        {
            f(name, proj);
        }
    });
}

/// Every projection with its Hugging Face path, e.g. `model.layers.0.self_attn.q_proj`.
pub fn for_each_named(model: &mut Llama, mut f: impl FnMut(&str, &mut LoraLinear)) {
    for (name, proj) in model.projections_mut() {
        f(&name, proj);
    }
}

/// PEFT's `adapter_config.json`.
#[derive(Debug, Serialize, Deserialize)]
struct AdapterConfigFile {
    peft_type: String,
    task_type: String,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: TargetModules,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    inference_mode: bool,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    rank_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: serde_json::Map<String, serde_json::Value>,
}

/// PEFT writes `target_modules` as a list, or as one regex string.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum TargetModules {
    List(Vec<String>),
    Pattern(String),
}

const PEFT_PREFIX: &str = "base_model.model.";

/// Writes `adapter_model.safetensors` and `adapter_config.json` in PEFT's format into `dir`,
/// each through a temporary file and a rename.
pub fn save_peft(
    model: &mut Llama,
    config: &LoraConfig,
    base_model: &str,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for_each_named(model, |name, proj| {
        if let Some(lora) = &proj.lora {
            // burn [in, r] → PEFT lora_A [r, in]; burn [r, out] → PEFT lora_B [out, r].
            for (key, t) in [("lora_A", lora.a.val()), ("lora_B", lora.b.val())] {
                let t = t.transpose();
                let dims = t.dims().to_vec();
                let values = t
                    .into_data()
                    .convert::<f32>()
                    .try_to_vec::<f32>()
                    .expect("f32 factors");
                let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                tensors.insert(format!("{PEFT_PREFIX}{name}.{key}.weight"), (dims, bytes));
            }
        }
    });
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, (shape, bytes))| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .expect("consistent tensor view");
            (k.clone(), view)
        })
        .collect();
    let weights = dir.join("adapter_model.safetensors");
    let tmp = weights.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, None, &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &weights)?;

    let file = AdapterConfigFile {
        peft_type: "LORA".into(),
        task_type: "CAUSAL_LM".into(),
        r: config.r,
        lora_alpha: config.alpha,
        lora_dropout: config.dropout,
        target_modules: TargetModules::List(config.target_modules.clone()),
        base_model_name_or_path: Some(base_model.to_string()),
        bias: Some("none".into()),
        fan_in_fan_out: false,
        inference_mode: true,
        use_rslora: false,
        use_dora: false,
        rank_pattern: Default::default(),
        alpha_pattern: Default::default(),
    };
    crate::util::write_atomic(
        &dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&file)?.as_bytes(),
    )
}

/// Loads a PEFT LoRA adapter directory onto `model` (frozen base, adapters attached). Every
/// tensor of the file must land on a projection of this model, and every `target_modules`
/// entry must name one, or the load fails naming what does not fit.
pub fn load_peft(model: Llama, dir: &Path, device: &Device) -> Result<(Llama, LoraConfig)> {
    let config = read_adapter_config(dir)?;
    let weights = dir.join("adapter_model.safetensors");
    let checkpoint = SafetensorsFile::open_file(&weights)?;
    let (model, used) = attach_from(model, &checkpoint, &config, device)?;
    if used.is_empty() {
        bail!(
            "{}: no tensor matches this model's projections (expected keys like {PEFT_PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight)",
            dir.display()
        );
    }
    if let Some(stray) = checkpoint.names().find(|n| !used.contains(*n)) {
        bail!(
            "{}: tensor {stray:?} matches no projection of this model",
            weights.display()
        );
    }
    Ok((model, config))
}

/// `adapter_config.json`, checked for what ual supports.
fn read_adapter_config(dir: &Path) -> Result<LoraConfig> {
    let config_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let file: AdapterConfigFile = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid adapter config", config_path.display()))?;
    if file.peft_type != "LORA" {
        bail!(
            "{}: field `peft_type` is {:?}; only LORA is supported",
            config_path.display(),
            file.peft_type
        );
    }
    if file.use_rslora || file.use_dora || file.fan_in_fan_out {
        bail!(
            "{}: rsLoRA, DoRA and fan_in_fan_out adapters are not supported",
            config_path.display()
        );
    }
    if !file.rank_pattern.is_empty() || !file.alpha_pattern.is_empty() {
        bail!(
            "{}: per-module `rank_pattern`/`alpha_pattern` are not supported",
            config_path.display()
        );
    }
    let config = LoraConfig {
        r: file.r,
        alpha: file.lora_alpha,
        // Dropout acts only while training, so a resumed run keeps the rate it trained with.
        dropout: file.lora_dropout,
        target_modules: match file.target_modules {
            TargetModules::List(list) => list,
            TargetModules::Pattern(_) => targets().into_iter().map(String::from).collect(),
        },
    };
    let known = targets();
    if let Some(unknown) = config.target_modules.iter().find(|t| {
        !known
            .iter()
            .any(|k| t.as_str() == *k || t.ends_with(&format!(".{k}")))
    }) {
        bail!(
            "{}: field `target_modules` names {unknown:?}, which is not a projection of LLaMA-family models ({})",
            config_path.display(),
            known.join(", ")
        );
    }
    Ok(config)
}

/// Attaches the adapters `checkpoint` holds for `model`'s projections; returns the model and the
/// tensor names used.
fn attach_from(
    model: Llama,
    checkpoint: &SafetensorsFile,
    config: &LoraConfig,
    device: &Device,
) -> Result<(Llama, std::collections::BTreeSet<String>)> {
    let mut model = model.no_grad();
    let mut result = Ok(());
    let mut used = std::collections::BTreeSet::new();
    for_each_named(&mut model, |name, proj| {
        let a_key = format!("{PEFT_PREFIX}{name}.lora_A.weight");
        if result.is_err() || !checkpoint.contains(&a_key) {
            return;
        }
        let [d_in, d_out] = proj.dims();
        let read = |key: &str, shape: [usize; 2]| -> Result<Tensor<2>> {
            let values = checkpoint.read(key, &shape)?;
            Ok(Tensor::<2>::from_data(TensorData::new(values, shape), device).transpose())
        };
        let b_key = format!("{PEFT_PREFIX}{name}.lora_B.weight");
        match (
            read(&a_key, [config.r, d_in]),
            read(&b_key, [d_out, config.r]),
        ) {
            (Ok(a), Ok(b)) => {
                proj.lora = Some(adapter(name, a, b, config));
                used.extend([a_key, b_key]);
            }
            (Err(e), _) | (_, Err(e)) => result = Err(e),
        }
    });
    result?;
    Ok((model, used))
}
