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
