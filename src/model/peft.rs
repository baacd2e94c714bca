//! PEFT's adapter directory: `adapter_config.json` and `adapter_model.safetensors`, with the
//! factors transposed from burn's `[in, r]` / `[r, out]` to PEFT's `lora_A [r, in]` /
//! `lora_B [out, r]`. RoPE is rotate-half, so no q/k permutation needs undoing.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::llama::Llama;
use super::load::SafetensorsFile;
use super::lora::{LoraConfig, adapter, for_each_named, targets};
use crate::data::template::TemplateKind;

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
    if let Err(e) = safetensors::serialize_to_file(views, None, &tmp) {
        let _ = std::fs::remove_file(&tmp);
        bail!("cannot write {}: {e}", weights.display());
    }
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
    let (model, used) = attach_from(model, &checkpoint, &config, device)
        .map_err(|e| anyhow::anyhow!("{}: {e:#}", weights.display()))?;
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

/// A LoRA run's starting point from the PEFT adapter in `dir` (`init_adapter`): its factors,
/// trained on, which must have the run's rank, scale and targets.
pub fn load_initial(
    model: Llama,
    dir: &Path,
    wanted: &LoraConfig,
    device: &Device,
) -> Result<Llama> {
    let (model, found) = load_peft(model, dir, device)?;
    let mut found_targets = found.target_modules.clone();
    let mut wanted_targets = wanted.target_modules.clone();
    found_targets.sort();
    wanted_targets.sort();
    let differences = [
        ("r", found.r.to_string(), wanted.r.to_string()),
        ("alpha", found.alpha.to_string(), wanted.alpha.to_string()),
        (
            "target_modules",
            format!("{found_targets:?}"),
            format!("{wanted_targets:?}"),
        ),
    ];
    if let Some((key, found, wanted)) = differences.iter().find(|(_, f, w)| f != w) {
        bail!(
            "init_adapter {}: its {key} is {found} but lora.{key} is {wanted}; set --set lora.{key}={found} to continue it",
            dir.display()
        );
    }
    Ok(model)
}

/// The file in which ual records, beside PEFT's own, how the adapter was trained (PEFT
/// ignores files it does not know).
const RECORD_FILE: &str = "ual_adapter.json";

/// Writes into the adapter directory `dir` the template it was trained with (resolved, never
/// `auto`), and the base's tokenizer and template files, so that the adapter alone says how
/// to prompt it (as TRL's saved adapters carry their tokenizer).
pub fn save_companions(dir: &Path, base: &Path, template: TemplateKind) -> Result<()> {
    let record = serde_json::json!({ "template": template.name() });
    std::fs::write(
        dir.join(RECORD_FILE),
        serde_json::to_string_pretty(&record)?,
    )
    .with_context(|| format!("cannot write {}", dir.join(RECORD_FILE).display()))?;
    for (name, bytes) in super::save::source_files(base)?.1 {
        std::fs::write(dir.join(&name), bytes)
            .with_context(|| format!("cannot write {}", dir.join(&name).display()))?;
    }
    Ok(())
}

/// The template the adapter in `dir` recorded, if it recorded one.
pub fn recorded_template(dir: &Path) -> Result<Option<TemplateKind>> {
    let path = dir.join(RECORD_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let record: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let name = record["template"].as_str().unwrap_or_default();
    name.parse()
        .map(Some)
        .map_err(|e: String| anyhow::anyhow!("{}: field `template`: {e}", path.display()))
}

/// The adapter's `base_model_name_or_path`, if it names one.
pub fn base_model_of(dir: &Path) -> Result<Option<std::path::PathBuf>> {
    let config_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let file: AdapterConfigFile = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid adapter config", config_path.display()))?;
    Ok(file.base_model_name_or_path.map(Into::into))
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
        if result.is_err() {
            return;
        }
        if !checkpoint.contains(&a_key) {
            // Every (layer, module) pair that target_modules implies must be there: a partial
            // adapter would load as another model, without a word.
            if let Some(t) = config
                .target_modules
                .iter()
                .find(|t| name.ends_with(t.as_str()))
            {
                result = Err(anyhow::anyhow!(
                    "tensor `{a_key}` is missing: `target_modules` lists {t:?}, so every layer's must be present"
                ));
            }
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
