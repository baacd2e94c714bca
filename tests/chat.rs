//! Chat data: minijinja renders real Hugging Face chat templates exactly as transformers'
//! Jinja does, and only assistant turns carry loss.

mod common;

use common::fixtures;
use serde::Deserialize;
use ual::data::batch::encode_segments;
use ual::data::formats::{Body, Message};
use ual::data::template::{ChatTemplate, Template};
use ual::model::Tokenizer;

#[derive(Deserialize)]
struct Expected {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    template: String,
    messages: Vec<Turn>,
    text: String,
    ids: Vec<u32>,
    loss_mask: Vec<bool>,
}

#[derive(Deserialize)]
struct Turn {
    role: String,
    content: String,
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(&fixtures().join("tokenizer/tokenizer.json"), 32000).unwrap()
}

#[test]
fn chat_templates_match_transformers_ids_and_assistant_mask() {
    let expected: Expected = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("chat/expected.json")).unwrap(),
    )
    .unwrap();
    let tokenizer = tokenizer();
    assert!(expected.cases.len() >= 4);
    for case in &expected.cases {
        let chat = ChatTemplate::load(&fixtures().join("chat").join(&case.template)).unwrap();
        let messages: Vec<Message> = case
            .messages
            .iter()
            .map(|t| Message::new(&t.role, &t.content))
            .collect();
        assert_eq!(
            chat.render(&messages, false).unwrap(),
            case.text,
            "{}: rendered text",
            case.template
        );
        let template = Template::Chat(chat);
        let body = Body::Chat { messages };
        assert!(template.writes_special_tokens(&body));
        let segments = template.segments(&body).unwrap();
        let (ids, mask) = encode_segments(&tokenizer, &segments, None).unwrap();
        assert_eq!(ids, case.ids, "{}: ids", case.template);
        assert_eq!(mask, case.loss_mask, "{}: loss mask", case.template);
        let trained: Vec<u32> = ids
            .iter()
            .zip(&mask)
            .filter(|(_, m)| **m)
            .map(|(i, _)| *i)
            .collect();
        let text = tokenizer.decode(&trained).unwrap();
        assert!(
            !text.contains("[INST]") && !text.contains("user"),
            "{}: only assistant text trains: {text:?}",
            case.template
        );
    }
}

#[test]
fn a_template_error_is_reported_with_its_message() {
    let template =
        Template::Chat(ChatTemplate::load(&fixtures().join("chat/llama2-chat")).unwrap());
    let body = Body::Chat {
        messages: vec![
            Message::new("user", "Hi"),
            Message::new("user", "again"),
            Message::new("assistant", "Hello"),
        ],
    };
    let msg = format!("{:#}", template.segments(&body).unwrap_err());
    assert!(msg.contains("roles must alternate"), "{msg}");
    let err = ChatTemplate::load(&fixtures().join("tokenizer"))
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("no field `chat_template`"));
}

#[test]
fn alpaca_renders_conversations_with_loss_on_assistant_turns() {
    let body = Body::Chat {
        messages: vec![
            Message::new("user", "Name a fruit."),
            Message::new("assistant", "Apple."),
            Message::new("user", "Another?"),
            Message::new("assistant", "Pear."),
        ],
    };
    let segments = Template::Alpaca.segments(&body).unwrap();
    let trains: Vec<&str> = segments
        .iter()
        .filter(|s| s.trains)
        .map(|s| s.text.as_str())
        .collect();
    assert_eq!(trains, ["Apple.", "Pear."]);
    assert!(
        segments[0]
            .text
            .ends_with("### Instruction:\nName a fruit.\n\n### Response:\n")
    );
    let (ids, mask) = encode_segments(&tokenizer(), &segments, Some(2)).unwrap();
    assert_eq!(ids.last(), Some(&2));
    assert!(mask.last().copied().unwrap(), "EOS is a response token");
    assert!(!mask[0]);
}

#[test]
fn the_model_s_own_chat_format_is_used_without_a_flag() {
    // SmolLM2 ships a ChatML template: training, the adapter and generation use it unasked.
    let model = common::smollm2();
    let model = model.to_str().unwrap();
    let runs = std::env::temp_dir().join(format!("ual-test-auto-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&runs);
    let data = fixtures().join("smollm2/score.jsonl");
    let (_, said) = common::ual_run(&[
        "train",
        "--device",
        "cpu",
        "--set",
        &format!("model={model}"),
        "--set",
        &format!("train_data={}", data.display()),
        "--set",
        "steps=2",
        "--set",
        "batch_size=2",
        "--set",
        "lora.r=2",
        "--set",
        "eval_every=0",
        "--set",
        &format!("output_dir={}", runs.display()),
        "--set",
        "name=auto",
    ]);
    assert!(said.contains("template: chat_template"), "{said}");
    let adapter = runs.join("auto/adapter");
    for file in [
        "ual_adapter.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(adapter.join(file).exists(), "the adapter carries {file}");
    }
    let adapter = adapter.to_str().unwrap();
    let prompts = runs.join("prompts.json");
    std::fs::write(&prompts, r#"["What is the capital of France?"]"#).unwrap();
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--device",
            "cpu",
            "--model",
            model,
            "--adapter",
            adapter,
            "--input",
            prompts.to_str().unwrap(),
            "--max-new-tokens",
            "2",
        ];
        args.extend_from_slice(extra);
        common::ual_run(&args)
    };
    let prompt_with = |extra: &[&str]| {
        let (out, said) = generate(extra);
        let line: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        (line["prompt"].as_str().unwrap().to_string(), said)
    };
    let (unasked, _) = prompt_with(&[]);
    let (chat, _) = prompt_with(&["--template", "chat_template"]);
    let (alpaca, warned) = prompt_with(&["--template", "alpaca"]);
    assert!(unasked.starts_with("<|im_start|>system"), "{unasked}");
    assert_eq!(
        unasked, chat,
        "no flag means the adapter's recorded template"
    );
    assert!(alpaca.starts_with("Below is an instruction"), "{alpaca}");
    assert!(
        warned.contains("differs from the chat_template"),
        "{warned}"
    );
    let (eval, _) = generate(&["--format", "alpaca-eval"]);
    let eval: serde_json::Value = serde_json::from_str(&eval).unwrap();
    assert_eq!(
        eval[0]["generator"], "auto",
        "a run's adapter answers under the run's name"
    );

    // A merged model keeps the template: scoring it unasked renders as transformers'
    // apply_chat_template did for the fixture (tests/fixtures/smollm2/score_expected.json).
    let merged = runs.join("merged");
    common::ual_run(&[
        "merge",
        "--device",
        "cpu",
        "--model",
        model,
        "--adapter",
        adapter,
        "--output",
        merged.to_str().unwrap(),
    ]);
    assert!(merged.join("tokenizer_config.json").exists());
    let (scored, _) = common::ual_run(&[
        "score",
        "--json",
        "--device",
        "cpu",
        "--model",
        merged.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("smollm2/score_expected.json")).unwrap(),
    )
    .unwrap();
    for (line, want) in scored.lines().zip(expected["lines"].as_array().unwrap()) {
        let got: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            got["response_tokens"], want["response_tokens"],
            "the chat rendering"
        );
    }
}
