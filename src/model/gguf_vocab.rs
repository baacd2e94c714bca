//! A Hugging Face directory's tokenizer as GGUF `tokenizer.*` metadata, for writing a model
//! that came from safetensors: byte-level BPE becomes `gpt2` with the llama.cpp name of its
//! pre-tokenizer, and byte-fallback BPE (Llama 2's SentencePiece) becomes `llama`, each merged
//! piece scored by its merge's rank so that llama.cpp's highest-score-first merging applies
//! the merges in the same order.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::Value as Json;

use super::config::ModelConfig;
use crate::data::template::ChatTemplate;
use crate::gguf::GgufWriter;
use crate::gguf::tokenizer::{BYTE, CONTROL, LLAMA3_SPLIT, NORMAL, QWEN2_SPLIT, USER_DEFINED};
use crate::gguf::write::Meta;

/// Writes `dir`'s tokenizer, special ids and chat template into `w`.
pub fn from_directory(w: &mut GgufWriter, dir: &Path) -> Result<()> {
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let json: Json =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let at = |what: String| format!("{}: {what}", path.display());
    let model = &json["model"];
    if model["type"] != "BPE" {
        bail!(at(format!(
            "model type {} cannot be written to GGUF (BPE can)",
            model["type"]
        )));
    }
    let (tokens, types) = vocabulary(&json).with_context(|| at("invalid `model.vocab`".into()))?;
    let merges = merges(model).with_context(|| at("invalid `model.merges`".into()))?;
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    if model["byte_fallback"] == true {
        let scores = scores(&tokens, &merges);
        let prefix = json["normalizer"].to_string().contains("Prepend")
            || json["pre_tokenizer"].to_string().contains("\"first\"")
            || json["pre_tokenizer"].to_string().contains("\"always\"");
        w.meta("tokenizer.ggml.model", Meta::Str("llama".into()))
            .meta("tokenizer.ggml.scores", Meta::F32s(scores))
            .meta("tokenizer.ggml.add_space_prefix", Meta::Bool(prefix));
        if let Some(unk) = model["unk_token"]
            .as_str()
            .and_then(|u| tokens.iter().position(|t| t == u))
        {
            w.meta("tokenizer.ggml.unknown_token_id", Meta::U32(unk as u32));
        }
    } else {
        let pre = pre_name(&json["pre_tokenizer"]).with_context(|| at("its pre-tokenizer has no llama.cpp name (known: GPT-2's ByteLevel, SmolLM's digits + ByteLevel, Llama 3's and Qwen2's splits)".into()))?;
        w.meta("tokenizer.ggml.model", Meta::Str("gpt2".into()))
            .meta("tokenizer.ggml.pre", Meta::Str(pre.into()))
            .meta("tokenizer.ggml.merges", Meta::Strs(merges));
    }
    w.meta("tokenizer.ggml.tokens", Meta::Strs(tokens))
        .meta("tokenizer.ggml.token_type", Meta::I32s(types));
    if let Some(bos) = config.bos_token_id {
        w.meta("tokenizer.ggml.bos_token_id", Meta::U32(bos));
    }
    if let Some(&eos) = config.eos_token_ids.first() {
        w.meta("tokenizer.ggml.eos_token_id", Meta::U32(eos));
    }
    let adds_bos = json["post_processor"]["single"]
        .as_array()
        .and_then(|s| s.first())
        .is_some_and(|first| first.get("SpecialToken").is_some());
    w.meta("tokenizer.ggml.add_bos_token", Meta::Bool(adds_bos))
        .meta("tokenizer.ggml.add_eos_token", Meta::Bool(false));
    if let Ok(template) = ChatTemplate::load(dir) {
        w.meta(
            "tokenizer.chat_template",
            Meta::Str(template.source().into()),
        );
    }
    Ok(())
}

/// Tokens by id (the model's vocabulary and the added tokens), with llama.cpp's token types.
fn vocabulary(json: &Json) -> Option<(Vec<String>, Vec<i32>)> {
    let vocab = json["model"]["vocab"].as_object()?;
    let added = json["added_tokens"].as_array().cloned().unwrap_or_default();
    let ids = vocab.values().filter_map(Json::as_u64);
    let added_ids = added.iter().filter_map(|t| t["id"].as_u64());
    let n = ids.chain(added_ids).max()? as usize + 1;
    // Ids nothing names are padding, as llama.cpp's converter writes them.
    let mut tokens: Vec<String> = (0..n).map(|i| format!("[PAD{i}]")).collect();
    let mut types = vec![USER_DEFINED as i32; n];
    let byte_fallback = json["model"]["byte_fallback"] == true;
    for (token, id) in vocab {
        let id = id.as_u64()? as usize;
        let is_byte =
            byte_fallback && token.len() == 6 && token.starts_with("<0x") && token.ends_with('>');
        tokens[id] = token.clone();
        types[id] = if is_byte { BYTE } else { NORMAL } as i32;
    }
    for t in &added {
        let id = t["id"].as_u64()? as usize;
        tokens[id] = t["content"].as_str()?.to_string();
        types[id] = if t["special"] == true {
            CONTROL
        } else {
            USER_DEFINED
        } as i32;
    }
    Some((tokens, types))
}

/// Merges as `"left right"`, whichever of tokenizers' two spellings the file uses.
fn merges(model: &Json) -> Option<Vec<String>> {
    model["merges"]
        .as_array()?
        .iter()
        .map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(pair) => Some(format!(
                "{} {}",
                pair.first()?.as_str()?,
                pair.get(1)?.as_str()?
            )),
            _ => None,
        })
        .collect()
}

/// SentencePiece scores: a merged piece scores minus its merge's rank, so the earliest merge
/// wins; pieces no merge makes score below every merge.
fn scores(tokens: &[String], merges: &[String]) -> Vec<f32> {
    let index: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut scores = vec![-(merges.len() as f32) - 1.0; tokens.len()];
    for (rank, merge) in merges.iter().enumerate().rev() {
        let piece: String = merge.split(' ').collect();
        if let Some(&id) = index.get(piece.as_str()) {
            scores[id] = -(rank as f32);
        }
    }
    scores
}

/// llama.cpp's `tokenizer.ggml.pre` for a byte-level pre-tokenizer, if it has one.
fn pre_name(pre: &Json) -> Option<&'static str> {
    let byte_level = |p: &Json| p["type"] == "ByteLevel";
    let split = |p: &Json, regex: &str| p["type"] == "Split" && p["pattern"]["Regex"] == regex;
    if byte_level(pre) && pre["use_regex"] != false {
        return Some("gpt-2");
    }
    let parts = pre["pretokenizers"].as_array()?;
    match parts.as_slice() {
        [digits, bl]
            if digits["type"] == "Digits"
                && digits["individual_digits"] == true
                && byte_level(bl) =>
        {
            Some("smollm")
        }
        [s, bl] if split(s, LLAMA3_SPLIT) && byte_level(bl) => Some("llama-bpe"),
        [s, bl] if split(s, QWEN2_SPLIT) && byte_level(bl) => Some("qwen2"),
        _ => None,
    }
}
