//! Answers to a file of prompts: what `ual generate --input` writes, and what a judge compares.

use anyhow::{Result, bail};
use serde::Serialize;

use crate::data::formats::{Body, Example, user_text};
use crate::data::template::Template;
use crate::model::Pretrained;
use crate::model::generate::{Finish, GenerationConfig};

/// One example's prompt, as the model saw it, and the model's answer.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    /// 0-based position of the example in its file.
    pub index: usize,
    /// The question in words: the user's last turn, or a completion line's prompt.
    pub instruction: String,
    /// The rendered prompt the model continued.
    pub prompt: String,
    /// The continuation.
    pub generation: String,
    /// Why decoding stopped.
    pub finish: Finish,
}

/// What to do with a prompt that alone fills the model's positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LongPrompt {
    /// Stop, naming the line.
    #[default]
    Error,
    /// Answer nothing for it: its line says `"finish": "skipped"`.
    Skip,
    /// Keep the prompt's last tokens, so that it and `max_new_tokens` fit.
    TruncateLeft,
}

/// Answers each example's prompt, rendered as training renders it ([`Template::prompt_of`]),
/// calling `on_answer` as each one is ready. A prompt too long for the model is handled as
/// `long` says; an error names the example's line.
pub fn answer_all(
    pretrained: &Pretrained,
    template: &Template,
    examples: &[Example],
    config: &GenerationConfig,
    long: LongPrompt,
    mut on_answer: impl FnMut(&Answer) -> Result<()>,
) -> Result<Vec<Answer>> {
    let mut answers = Vec::with_capacity(examples.len());
    let positions = pretrained.config.max_position_embeddings;
    for (index, example) in examples.iter().enumerate() {
        let (prompt, special) = template.prompt_of(&example.body)?;
        let mut ids = pretrained.tokenizer.encode_with(&prompt, special)?;
        let skip = ids.len() >= positions;
        if skip && long == LongPrompt::Error {
            bail!(
                "line {}: the prompt has {} tokens; the model has {positions} positions (--on-long-prompt skip or truncate-left)",
                example.line,
                ids.len()
            );
        }
        if skip && long == LongPrompt::TruncateLeft {
            let keep = positions
                .saturating_sub(config.max_new_tokens)
                .max(positions / 2);
            ids.drain(..ids.len() - keep);
        }
        let generation = match skip && long == LongPrompt::Skip {
            true => crate::model::generate::Generation {
                ids: Vec::new(),
                text: String::new(),
                finish: Finish::Skipped,
            },
            false => pretrained.continue_ids(ids, config)?,
        };
        let answer = Answer {
            index,
            instruction: instruction(&example.body),
            prompt,
            generation: generation.text,
            finish: generation.finish,
        };
        on_answer(&answer)?;
        answers.push(answer);
    }
    Ok(answers)
}

/// What produced a set of answers, recorded in each of its lines so that a file of answers
/// says how it was made.
#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    /// The model directory.
    pub model: String,
    /// The adapter directory, if one was applied.
    pub adapter: Option<String>,
    /// The prompt template.
    pub template: crate::data::template::TemplateKind,
    /// The decoding settings.
    pub decoding: GenerationConfig,
}

/// One line of an answers file (what `ual eval judge` reads): the answer and its provenance.
pub fn answer_line(answer: &Answer, provenance: &Provenance) -> String {
    let mut line = serde_json::to_value(answer).expect("an answer serialises");
    let extra = serde_json::to_value(provenance).expect("provenance serialises");
    if let (Some(line), serde_json::Value::Object(extra)) = (line.as_object_mut(), extra) {
        line.extend(extra);
    }
    line.to_string()
}

/// AlpacaEval's model outputs: a JSON array of `{"instruction", "output", "generator"}`.
pub fn alpaca_eval(answers: &[Answer], generator: &str) -> serde_json::Value {
    answers
        .iter()
        .map(|a| {
            serde_json::json!({
                "instruction": a.instruction, "output": a.generation.trim(), "generator": generator,
            })
        })
        .collect()
}

/// The question of an example in words: the user's last turn, or the prompt.
pub fn instruction(body: &Body) -> String {
    match body {
        Body::Completion { prompt, .. } => prompt.clone(),
        Body::Alpaca {
            instruction, input, ..
        } => user_text(instruction, input),
        Body::Chat { messages } => messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.clone())
            .unwrap_or_default(),
    }
}
