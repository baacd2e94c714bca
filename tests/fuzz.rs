//! Property tests of every parser that reads outside input: JSONL lines, `--set` and TOML
//! configurations, the annotate reply parser, chat templates, adapter configs and safetensors
//! headers. None may panic: every bad input must come back as an error (or, for the reply
//! parser, as no score or a score on the scale). Each runs a fixed number of cases with a fixed
//! seed, so CI runs the same cases every time.

mod common;

use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{Value, json};

/// Cases per property: enough to reach the odd shapes, few enough for CI (under a second each
/// but the file-backed ones).
const CASES: u32 = 256;

fn runner(cases: u32) -> TestRunner {
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]))
}

/// JSON values of any shape, with the keys the formats look for more often than chance would.
fn json_value() -> impl Strategy<Value = Value> {
    let keys = prop::sample::select(vec![
        "instruction",
        "input",
        "output",
        "messages",
        "conversations",
        "role",
        "content",
        "from",
        "value",
        "prompt",
        "completion",
        "uncertainty",
        "system",
        "x",
    ]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<f64>().prop_map(|f| json!(f)),
        any::<i64>().prop_map(|i| json!(i)),
        ".{0,12}".prop_map(Value::String),
        prop::sample::select(vec!["user", "assistant", "system", "human", "gpt", ""])
            .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(keys.clone().prop_map(String::from), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn jsonl_lines_parse_or_fail_cleanly() {
    let line = prop_oneof![json_value().prop_map(|v| v.to_string()), ".{0,80}"];
    runner(CASES * 4)
        .run(&line, |line| {
            let _ = ual::data::formats::parse_line(&line, 1);
            Ok(())
        })
        .unwrap();
}

#[test]
fn set_overrides_and_toml_configs_parse_or_fail_cleanly() {
    let key = prop::sample::select(vec![
        "steps",
        "optim.lr",
        "optim.beta2",
        "lora.r",
        "smoothing.loss",
        "smoothing.scale",
        "name",
        "eval_data",
        "device",
        "base_dtype",
        "gradient_checkpointing",
        "optim",
        "lora.x",
        "",
    ]);
    let value = prop_oneof![
        ".{0,10}",
        any::<i64>().prop_map(|i| i.to_string()),
        any::<f64>().prop_map(|f| f.to_string())
    ];
    let overrides = prop::collection::vec((key, value).prop_map(|(k, v)| format!("{k}={v}")), 0..4);
    runner(CASES)
        .run(&overrides, |sets| {
            let _ = ual::train::TrainConfig::resolve(None, &sets);
            Ok(())
        })
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    runner(CASES / 2)
        .run(&".{0,120}", |text| {
            std::fs::write(&file, &text).unwrap();
            let _ = ual::train::TrainConfig::resolve(Some(&file), &[]);
            Ok(())
        })
        .unwrap();
}

#[test]
fn reply_scores_are_none_or_on_the_scale() {
    let reply = prop_oneof![
        ".{0,60}",
        (any::<f64>(), ".{0,20}").prop_map(|(f, s)| format!("{s} {f} {s}")),
        any::<i64>().prop_map(|i| format!("Score: {i}")),
        json_value().prop_map(|v| v.to_string()),
    ];
    runner(CASES * 4)
        .run(&reply, |reply| {
            for scale in [[1.0, 10.0], [0.0, 99.0]] {
                if let Some(s) = ual::annotate::parse::parse_score(&reply, scale) {
                    prop_assert!(
                        s.is_finite() && (scale[0]..=scale[1]).contains(&s),
                        "{reply:?} -> {s}"
                    );
                }
            }
            Ok(())
        })
        .unwrap();
}

/// A judge's reply with any text, non-ASCII included, around a verdict: parsing never panics,
/// and text before the last "Judgment" never changes the digit read after it.
#[test]
fn judge_verdicts_read_the_digit_after_the_judgment() {
    use ual::judge::verdict::{Verdict, parse_verdict};
    let reply = (".{0,40}", "(?i)judge?ment", 1u8..=3, "[ .)(a-z0-9]{0,12}");
    runner(CASES * 4)
        .run(&reply, |(prefix, word, digit, suffix)| {
            let _ = parse_verdict(&prefix);
            let text = format!("{prefix}\n### {word}: {digit}. {suffix}");
            let expected = Verdict::from_score(digit as f64);
            if !suffix.contains("judg") {
                prop_assert_eq!(parse_verdict(&text), expected, "{:?}", text);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn chat_templates_load_render_or_fail_cleanly() {
    let pieces = prop::sample::select(vec![
        "{% for m in messages %}",
        "{% endfor %}",
        "{{ m['content'] }}",
        "{{ m.role }}",
        "{% if add_generation_prompt %}",
        "{% endif %}",
        "{{ bos_token }}",
        "{{ raise_exception('no') }}",
        "{{",
        "}}",
        "{%",
        "x",
        "\n",
        "{{ messages[5].content }}",
    ]);
    let template = prop::collection::vec(pieces, 0..8).prop_map(|p| p.concat());
    let dir = tempfile::tempdir().unwrap();
    runner(CASES / 2)
        .run(&template, |source| {
            let config = json!({"chat_template": source, "bos_token": "<s>", "eos_token": "</s>"});
            std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
            if let Ok(t) = ual::data::template::ChatTemplate::load(dir.path()) {
                let messages = [ual::data::formats::Message::new("user", "hi")];
                let _ = t.render(&messages, true);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn adapter_configs_load_or_fail_cleanly() {
    let device = burn::tensor::Device::flex();
    let base = ual::model::Pretrained::load(&common::fixture_model("llama-gqa"), &device).unwrap();
    let source = common::fixtures().join("adapters/llama-gqa-peft");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        source.join("adapter_model.safetensors"),
        dir.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    let text = std::fs::read_to_string(source.join("adapter_config.json")).unwrap();
    let real: Value = serde_json::from_str(&text).unwrap();
    // The real config with one field replaced by an arbitrary value, or arbitrary JSON.
    let field = prop::sample::select(vec![
        "r",
        "lora_alpha",
        "target_modules",
        "peft_type",
        "use_dora",
        "rank_pattern",
        "lora_dropout",
    ]);
    let config = prop_oneof![
        (field, json_value()).prop_map(move |(f, v)| {
            let mut c = real.clone();
            c[f] = v;
            c.to_string()
        }),
        json_value().prop_map(|v| v.to_string()),
    ];
    runner(CASES / 4)
        .run(&config, |config| {
            std::fs::write(dir.path().join("adapter_config.json"), &config).unwrap();
            let _ = ual::model::peft::load_peft(base.model.clone(), dir.path(), &device);
            Ok(())
        })
        .unwrap();
}

#[test]
fn safetensors_headers_open_or_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.safetensors");
    let header = json_value().prop_map(|v| v.to_string().into_bytes());
    let file = (
        header,
        any::<u64>(),
        prop::collection::vec(any::<u8>(), 0..64),
        any::<bool>(),
    )
        .prop_map(|(header, claimed, data, honest)| {
            let len = if honest { header.len() as u64 } else { claimed };
            let mut bytes = len.to_le_bytes().to_vec();
            bytes.extend(header);
            bytes.extend(data);
            bytes
        });
    runner(CASES)
        .run(&file, |bytes| {
            std::fs::write(&path, &bytes).unwrap();
            if let Ok(f) = ual::model::load::SafetensorsFile::open_file(Path::new(&path)) {
                let names: Vec<String> = f.names().map(String::from).collect();
                for name in names {
                    let _ = f.read(&name, &[1]);
                }
            }
            Ok(())
        })
        .unwrap();
}
