//! A Hugging Face `tokenizer.json` built from a GGUF file's `tokenizer.ggml.*` metadata, so
//! that a GGUF model needs no other file: `gpt2` byte-level BPE (its merges and the
//! pre-tokenizer its `pre` names) and `llama` SentencePiece (merges by score, byte fallback).

use anyhow::{Context, Result, bail};
use serde_json::{Value as Json, json};

use super::file::{GgufFile, Value};

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
/// An ordinary piece.
pub const NORMAL: i64 = 1;
/// The unknown token.
pub const UNKNOWN: i64 = 2;
/// A special token (BOS, `<|im_end|>`): matched whole, left out when decoding.
pub const CONTROL: i64 = 3;
/// An added token that is not special.
pub const USER_DEFINED: i64 = 4;
/// A byte-fallback piece, `<0x0A>`.
pub const BYTE: i64 = 6;

/// Llama 3's split (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_LLAMA3`).
pub const LLAMA3_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split: Llama 3's with single digits.
pub const QWEN2_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The tokenizer of `file` as `tokenizer.json`, and the ids of its BOS and EOS tokens.
pub fn tokenizer_json(file: &GgufFile) -> Result<Json> {
    let path = file.path().display().to_string();
    let strings = |key: &str| -> Result<Vec<String>> {
        let values = file
            .get(key)
            .and_then(Value::as_array)
            .with_context(|| format!("{path}: metadata key `{key}` is missing or not an array"))?;
        values
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .with_context(|| format!("{path}: metadata key `{key}` holds a non-string"))
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let types: Vec<i64> = match file
        .get("tokenizer.ggml.token_type")
        .and_then(Value::as_array)
    {
        Some(a) => a
            .iter()
            .map(|v| match v {
                Value::I64(i) => *i,
                Value::U64(u) => *u as i64,
                _ => 1,
            })
            .collect(),
        None => vec![1; tokens.len()],
    };
    let model = file.str("tokenizer.ggml.model")?;
    let id = |key: &str| file.get(key).and_then(Value::as_u64).map(|v| v as usize);
    let flag = |key: &str, default: bool| file.get(key).and_then(Value::as_bool).unwrap_or(default);
    let bos = id("tokenizer.ggml.bos_token_id");
    let eos = id("tokenizer.ggml.eos_token_id");
    let added = added_tokens(&tokens, &types);
    let (body, add_bos_default) = match model {
        "gpt2" => (
            gpt2(file, &tokens, strings("tokenizer.ggml.merges")?)?,
            false,
        ),
        "llama" => (sentencepiece(file, &tokens, &types)?, true),
        other => bail!(
            "{path}: `tokenizer.ggml.model` is {other:?}; ual reads gpt2 (byte-level BPE) and llama (SentencePiece)"
        ),
    };
    let mut template = Vec::new();
    let mut specials = serde_json::Map::new();
    let mut special = |on: bool, id: Option<usize>, template: &mut Vec<Json>| {
        if let (true, Some(id)) = (on, id) {
            let token = &tokens[id];
            template.push(json!({"SpecialToken": {"id": token, "type_id": 0}}));
            specials.insert(
                token.clone(),
                json!({"id": token, "ids": [id], "tokens": [token]}),
            );
        }
    };
    special(
        flag("tokenizer.ggml.add_bos_token", add_bos_default),
        bos,
        &mut template,
    );
    template.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    special(
        flag("tokenizer.ggml.add_eos_token", false),
        eos,
        &mut template,
    );
    let mut tokenizer = body;
    tokenizer["version"] = json!("1.0");
    tokenizer["truncation"] = Json::Null;
    tokenizer["padding"] = Json::Null;
    tokenizer["added_tokens"] = Json::Array(added);
    tokenizer["post_processor"] = json!({
        "type": "TemplateProcessing",
        "single": template,
        "pair": template,
        "special_tokens": specials,
    });
    Ok(tokenizer)
}

/// Control and user-defined tokens, matched whole in the text before the model splits it.
fn added_tokens(tokens: &[String], types: &[i64]) -> Vec<Json> {
    tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, t))| matches!(**t, CONTROL | USER_DEFINED | UNKNOWN))
        .map(|(id, (content, t))| {
            json!({
                "id": id,
                "content": content,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": *t != USER_DEFINED,
            })
        })
        .collect()
}

fn vocab(tokens: &[String]) -> serde_json::Map<String, Json> {
    let mut vocab = serde_json::Map::new();
    for (id, token) in tokens.iter().enumerate() {
        // A duplicated piece keeps its first id, as llama.cpp's text-to-id map does.
        vocab.entry(token.clone()).or_insert(json!(id));
    }
    vocab
}

/// Byte-level BPE with the pre-tokenizer llama.cpp applies for `tokenizer.ggml.pre`.
fn gpt2(file: &GgufFile, tokens: &[String], merges: Vec<String>) -> Result<Json> {
    let pre = file
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("gpt-2");
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": use_regex});
    let split = |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
    let pre_tokenizer = match pre {
        "gpt-2" | "gpt2" | "default" => byte_level(true),
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" => {
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]})
        }
        "qwen2" | "deepseek-r1-qwen" => {
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]})
        }
        other => bail!(
            "{}: `tokenizer.ggml.pre` is {other:?}; ual knows gpt-2, smollm, llama-bpe (Llama 3) and qwen2",
            file.path().display()
        ),
    };
    Ok(json!({
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab(tokens), "merges": merges,
        },
    }))
}

/// SentencePiece as BPE: llama.cpp merges the adjacent pair whose union has the highest
/// score, which is BPE with merges ranked by that score; unknown bytes fall back to `<0xXX>`.
fn sentencepiece(file: &GgufFile, tokens: &[String], types: &[i64]) -> Result<Json> {
    let scores: Vec<f64> = file
        .get("tokenizer.ggml.scores")
        .and_then(Value::as_array)
        .with_context(|| {
            format!(
                "{}: metadata key `tokenizer.ggml.scores` is missing",
                file.path().display()
            )
        })?
        .iter()
        .map(|v| v.as_f64().unwrap_or(0.0))
        .collect();
    let vocab = vocab(tokens);
    let mut merges: Vec<(f64, usize, String)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types.get(id) != Some(&NORMAL) {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                merges.push((scores[id], id, format!("{left} {right}")));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let unk = file
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(Value::as_u64)
        .map(|id| json!(tokens[id as usize]))
        .unwrap_or(Json::Null);
    let prefix = file
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    // As llama.cpp does, a space is prepended to every stretch of text (after each special
    // token too): Llama 2's own `tokenizer.json` normaliser.
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let normalizer = if prefix {
        json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, replace]})
    } else {
        replace
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(json!({
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges.into_iter().map(|m| m.2).collect::<Vec<_>>(),
        },
    }))
}
