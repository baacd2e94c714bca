//! Answers to a file of prompts: what `ual generate --input` writes, and what a judge compares.

use anyhow::{Result, bail};
use serde::Serialize;

use crate::data::formats::{Body, Example, user_text};
use crate::data::template::Template;
use crate::model::Pretrained;
use crate::model::generate::{Finish, Generation, GenerationConfig, generate};

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
    /// Tokens generated.
    #[serde(skip)]
    pub tokens: usize,
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

/// Prompts decoded together by default: on 2 CPU cores a batch of 16 gives 6.7× the tokens/s
/// of one prompt on SmolLM2-135M (`BENCHMARKS.md`); 8 keeps a 7B model's KV cache for long
/// prompts within a laptop's memory.
pub const BATCH: usize = 8;

/// Answers each example's prompt, rendered as training renders it ([`Template::prompt_of`]),
/// `batch` prompts decoded together (example `i` samples from its own stream, so a seed gives
/// the same text at any batch size), calling `on_answer` as each one is ready. A prompt too
/// long for the model is handled as `long` says; an error names the example's line.
pub fn answer_all(
    pretrained: &Pretrained,
    template: &Template,
    examples: &[Example],
    config: &GenerationConfig,
    long: LongPrompt,
    batch: usize,
    mut on_answer: impl FnMut(&Answer) -> Result<()>,
) -> Result<Vec<Answer>> {
    let batch = batch.max(1);
    let eos = &pretrained.config.eos_token_ids;
    let mut answers = Vec::with_capacity(examples.len());
    for (chunk_index, chunk) in examples.chunks(batch).enumerate() {
        let asked = chunk
            .iter()
            .map(|example| prompt_ids(pretrained, template, example, config, long))
            .collect::<Result<Vec<_>>>()?;
        let (streams, ids): (Vec<usize>, Vec<Vec<u32>>) = asked
            .iter()
            .enumerate()
            .filter_map(|(offset, (_, ids))| Some((chunk_index * batch + offset, ids.clone()?)))
            .unzip();
        let mut generations = match ids.is_empty() {
            true => Vec::new(),
            false => generate(
                &pretrained.model,
                &pretrained.tokenizer,
                eos,
                &ids,
                &streams,
                config,
                |_, _| {},
            )?,
        }
        .into_iter();
        for (offset, (example, (prompt, ids))) in chunk.iter().zip(asked).enumerate() {
            let generation = match ids {
                Some(_) => generations.next().expect("one generation per prompt asked"),
                None => Generation {
                    ids: Vec::new(),
                    text: String::new(),
                    finish: Finish::Skipped,
                },
            };
            let answer = Answer {
                index: chunk_index * batch + offset,
                instruction: instruction(&example.body),
                prompt,
                generation: generation.text,
                finish: generation.finish,
                tokens: generation.ids.len(),
            };
            on_answer(&answer)?;
            answers.push(answer);
        }
    }
    Ok(answers)
}

/// An example's rendered prompt and its ids, `None` when `long` skips it.
fn prompt_ids(
    pretrained: &Pretrained,
    template: &Template,
    example: &Example,
    config: &GenerationConfig,
    long: LongPrompt,
) -> Result<(String, Option<Vec<u32>>)> {
    let positions = pretrained.config.max_position_embeddings;
    let (prompt, special) = template.prompt_of(&example.body)?;
    let mut ids = pretrained.tokenizer.encode_with(&prompt, special)?;
    if ids.len() < positions {
        return Ok((prompt, Some(ids)));
    }
    match long {
        LongPrompt::Error => bail!(
            "line {}: the prompt has {} tokens; the model has {positions} positions (--on-long-prompt skip or truncate-left)",
            example.line,
            ids.len()
        ),
        LongPrompt::Skip => Ok((prompt, None)),
        LongPrompt::TruncateLeft => {
            let keep = positions
                .saturating_sub(config.max_new_tokens)
                .max(positions / 2);
            ids.drain(..ids.len() - keep);
            Ok((prompt, Some(ids)))
        }
    }
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

/// AlpacaEval's model outputs: a JSON array of `{"instruction", "output", "generator"}`, each
/// with the other fields of its input item (`dataset`, ids) kept as they were.
pub fn alpaca_eval(
    answers: &[Answer],
    fields: &[serde_json::Map<String, serde_json::Value>],
    generator: &str,
) -> serde_json::Value {
    answers
        .iter()
        .zip(fields)
        .map(|(a, fields)| {
            let mut item = fields.clone();
            item.retain(|k, _| !matches!(k.as_str(), "output" | "generator"));
            item.entry("instruction")
                .or_insert_with(|| a.instruction.clone().into());
            item.insert("output".into(), a.generation.trim().into());
            item.insert("generator".into(), generator.into());
            serde_json::Value::Object(item)
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
