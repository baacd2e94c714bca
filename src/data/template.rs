//! Prompt templates: how an example becomes text, cut into segments that either carry loss (the
//! response, assistant turns) or are context (prompts, user and system turns, template markup).
//!
//! Four templates exist, and `auto` (the default) picks the model's own chat template when it
//! ships one and Alpaca otherwise. `alpaca` is the Stanford Alpaca format. `chat_template`
//! is the Jinja template in the model's `tokenizer_config.json` (or `chat_template.jinja`),
//! rendered with minijinja as transformers renders it. `vicuna` and `vicuna_lima` are the
//! authors' turn format (`generate_prompt` in their `scripts/prepare_llama2.py` and
//! `prepare_lima.py`): per turn `"\n\n### User: {instruction}\n\n### Assistant: "` + response,
//! with one leading newline in the LIMA/Deita/MetaMath scripts, each turn tokenised on its own
//! (with BOS) and ending in EOS. `prompt`/`completion` lines use no template.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::formats::{Body, Message, user_text};

const ALPACA_PREAMBLE: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.";
const ALPACA_INPUT_PREAMBLE: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.";

/// Which template Alpaca and chat examples use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateKind {
    /// The model's `chat_template` if it has one, else Alpaca (the default).
    #[default]
    Auto,
    /// The Alpaca prompt.
    Alpaca,
    /// The model's own `chat_template`, from `tokenizer_config.json`.
    ChatTemplate,
    /// The authors' `prepare_llama2.py` / `prepare_mistral.py` turns (`"\n\n### User: "`).
    Vicuna,
    /// The authors' `prepare_lima.py` / `prepare_deita.py` turns (`"\n### User: "`).
    VicunaLima,
}

impl std::str::FromStr for TemplateKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "alpaca" => Ok(Self::Alpaca),
            "chat_template" => Ok(Self::ChatTemplate),
            "vicuna" => Ok(Self::Vicuna),
            "vicuna_lima" => Ok(Self::VicunaLima),
            other => Err(format!(
                "unknown template {other:?}; choose auto, alpaca, chat_template, vicuna or vicuna_lima"
            )),
        }
    }
}

impl TemplateKind {
    /// The setting's name, as `--template` and the TOML key spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Alpaca => "alpaca",
            Self::ChatTemplate => "chat_template",
            Self::Vicuna => "vicuna",
            Self::VicunaLima => "vicuna_lima",
        }
    }

    /// `auto` made concrete for the model at `model`: its chat template if it ships one.
    pub fn resolve(self, model: &Path) -> Self {
        match self {
            Self::Auto if ChatTemplate::exists(model) => Self::ChatTemplate,
            Self::Auto => Self::Alpaca,
            kind => kind,
        }
    }
}

/// A piece of an example's text; `trains` marks the pieces whose tokens carry loss.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// The segment's text.
    pub text: String,
    /// Whether its tokens carry loss.
    pub trains: bool,
}

impl Segment {
    fn context(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            trains: false,
        }
    }
    fn response(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            trains: true,
        }
    }
}

/// A loaded template.
pub enum Template {
    /// The Alpaca prompt.
    Alpaca,
    /// A Hugging Face chat template.
    Chat(ChatTemplate),
    /// The authors' turns.
    Vicuna {
        /// The text before `### User:`.
        lead: &'static str,
    },
}

impl Template {
    /// The template of `kind` for the model in `model_dir`.
    pub fn load(kind: TemplateKind, model_dir: &Path) -> Result<Self> {
        Ok(match kind.resolve(model_dir) {
            TemplateKind::Alpaca | TemplateKind::Auto => Self::Alpaca,
            TemplateKind::ChatTemplate => Self::Chat(ChatTemplate::load(model_dir)?),
            TemplateKind::Vicuna => Self::Vicuna { lead: "\n\n" },
            TemplateKind::VicunaLima => Self::Vicuna { lead: "\n" },
        })
    }

    /// Which template this is (never `auto`).
    pub fn kind(&self) -> TemplateKind {
        match self {
            Self::Alpaca => TemplateKind::Alpaca,
            Self::Chat(_) => TemplateKind::ChatTemplate,
            Self::Vicuna { lead: "\n" } => TemplateKind::VicunaLima,
            Self::Vicuna { .. } => TemplateKind::Vicuna,
        }
    }

    /// The turns of an example for templates that tokenise each turn on its own: each turn is
    /// its prompt (context) and its response. `None` for the other templates, and for
    /// `prompt`/`completion` lines, which use no template.
    pub fn turns(&self, body: &Body) -> Option<Vec<Vec<Segment>>> {
        let Self::Vicuna { lead } = self else {
            return None;
        };
        let pairs = match body {
            Body::Completion { .. } => return None,
            Body::Alpaca {
                instruction,
                input,
                output,
            } => vec![(user_text(instruction, input), output.clone())],
            Body::Chat { messages } => vicuna_pairs(messages),
        };
        Some(
            pairs
                .into_iter()
                .map(|(user, response)| {
                    vec![
                        Segment::context(vicuna_prompt(lead, &user)),
                        Segment::response(response),
                    ]
                })
                .collect(),
        )
    }

    /// The segments of an example, in order.
    pub fn segments(&self, body: &Body) -> Result<Vec<Segment>> {
        Ok(match (self, body) {
            (_, Body::Completion { prompt, completion }) => {
                vec![
                    Segment::context(prompt.as_str()),
                    Segment::response(completion.as_str()),
                ]
            }
            (
                Self::Alpaca,
                Body::Alpaca {
                    instruction,
                    input,
                    output,
                },
            ) => {
                vec![
                    Segment::context(alpaca_prompt(instruction, input)),
                    Segment::response(output.as_str()),
                ]
            }
            (Self::Alpaca, Body::Chat { messages }) => alpaca_chat(messages),
            (
                Self::Chat(t),
                Body::Alpaca {
                    instruction,
                    input,
                    output,
                },
            ) => {
                let user = if input.trim().is_empty() {
                    instruction.clone()
                } else {
                    format!("{instruction}\n\n{input}")
                };
                t.segments(&[
                    Message::new("user", &user),
                    Message::new("assistant", output),
                ])?
            }
            (Self::Chat(t), Body::Chat { messages }) => t.segments(messages)?,
            (Self::Vicuna { .. }, body) => self
                .turns(body)
                .expect("vicuna turns of a templated body")
                .concat(),
        })
    }

    /// The text that asks for the next assistant turn after `messages` (ending with a user
    /// turn): how generation and evaluation prompt a model the way it was taught.
    pub fn prompt(&self, messages: &[Message]) -> Result<String> {
        match self {
            Self::Alpaca => {
                let (segments, rest) = alpaca_turns(messages);
                Ok(segments.iter().map(|s| s.text.as_str()).collect::<String>() + &rest)
            }
            Self::Chat(t) => t.render(messages, true),
            Self::Vicuna { lead } => {
                // Earlier turns as text; the question last, as the authors' evaluation asks it.
                let mut text = String::new();
                for (user, response) in vicuna_pairs(messages) {
                    text.push_str(&vicuna_prompt(lead, &user));
                    text.push_str(&response);
                }
                let answered = messages
                    .iter()
                    .rposition(|m| m.role == "assistant")
                    .map_or(0, |k| k + 1);
                let mut pending = String::new();
                for m in &messages[answered..] {
                    join_turn(&mut pending, &m.content);
                }
                text.push_str(&vicuna_prompt(lead, &pending));
                Ok(text)
            }
        }
    }

    /// The text that asks for an example's response, rendered as training renders it, and
    /// whether the tokenizer should add its special tokens: everything before the last
    /// response (a completion line's prompt as it is).
    pub fn prompt_of(&self, body: &Body) -> Result<(String, bool)> {
        let special = !self.prompt_has_special_tokens();
        match (self, body) {
            (_, Body::Completion { prompt, .. }) => Ok((prompt.clone(), true)),
            (
                Self::Alpaca,
                Body::Alpaca {
                    instruction, input, ..
                },
            ) => Ok((alpaca_prompt(instruction, input), special)),
            (
                _,
                Body::Alpaca {
                    instruction, input, ..
                },
            ) => {
                let user = Message::new("user", &user_text(instruction, input));
                Ok((self.prompt(&[user])?, special))
            }
            (_, Body::Chat { messages }) => {
                let asked = messages
                    .iter()
                    .rposition(|m| m.role == "assistant")
                    .unwrap_or(messages.len());
                Ok((self.prompt(&messages[..asked])?, special))
            }
        }
    }

    /// Whether a prompt from [`Template::prompt`] already holds its special tokens.
    pub fn prompt_has_special_tokens(&self) -> bool {
        matches!(self, Self::Chat(_))
    }

    /// Whether rendered text already holds the special tokens (chat templates write BOS and EOS
    /// themselves), so the tokenizer must not add them and no EOS is appended.
    pub fn writes_special_tokens(&self, body: &Body) -> bool {
        matches!(self, Self::Chat(_)) && !matches!(body, Body::Completion { .. })
    }
}

/// The authors' `generate_prompt(instruction)`, without a system prompt.
pub fn vicuna_prompt(lead: &str, instruction: &str) -> String {
    format!("{lead}### User: {instruction}\n\n### Assistant: ")
}

/// A conversation as (user text, response) pairs: consecutive user turns join with a newline,
/// a system turn joins the user text after it (the authors' template has no system part), and
/// a trailing user turn without an answer is left out.
fn vicuna_pairs(messages: &[Message]) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut user = String::new();
    for m in messages {
        match m.role.as_str() {
            "assistant" => pairs.push((std::mem::take(&mut user), m.content.clone())),
            _ => join_turn(&mut user, &m.content),
        }
    }
    pairs
}

fn join_turn(text: &mut String, turn: &str) {
    if !text.is_empty() {
        text.push('\n');
    }
    text.push_str(turn);
}

/// The Alpaca prompt, shared with generation so a tuned model is asked the way it was taught.
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.trim().is_empty() {
        format!("{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}\n\n### Response:\n")
    } else {
        format!(
            "{ALPACA_INPUT_PREAMBLE}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        )
    }
}

/// A conversation in Alpaca form: system turns replace the preamble, each user turn is an
/// instruction, each assistant turn a response, turns separated by a blank line.
fn alpaca_chat(messages: &[Message]) -> Vec<Segment> {
    alpaca_turns(messages).0
}

/// [`alpaca_chat`]'s segments, and the context after the last assistant turn.
fn alpaca_turns(messages: &[Message]) -> (Vec<Segment>, String) {
    let system: Vec<&str> = messages
        .iter()
        .filter(|m| m.role == "system")
        .map(|m| m.content.as_str())
        .collect();
    let mut context = if system.is_empty() {
        ALPACA_PREAMBLE.to_string()
    } else {
        system.join("\n")
    };
    let mut segments = Vec::new();
    for m in messages.iter().filter(|m| m.role != "system") {
        if m.role == "assistant" {
            segments.push(Segment::context(std::mem::take(&mut context)));
            segments.push(Segment::response(m.content.as_str()));
        } else {
            context.push_str(&format!(
                "\n\n### Instruction:\n{}\n\n### Response:\n",
                m.content
            ));
        }
    }
    (segments, context)
}

/// A Hugging Face chat template with the special-token strings it refers to.
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
    origin: String,
}

impl ChatTemplate {
    /// Whether the model at `model` (a directory or a GGUF file) ships a chat template.
    pub fn exists(model: &Path) -> bool {
        if crate::gguf::is_gguf(model) {
            return crate::gguf::GgufFile::open(model)
                .is_ok_and(|f| f.get("tokenizer.chat_template").is_some());
        }
        let config = std::fs::read_to_string(model.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
        config.is_some_and(|c| !c["chat_template"].is_null())
            || model.join("chat_template.jinja").exists()
    }

    /// Reads `chat_template` from `tokenizer_config.json`, or `chat_template.jinja`.
    pub fn load(model_dir: &Path) -> Result<Self> {
        if crate::gguf::is_gguf(model_dir) {
            return Self::from_gguf(&crate::gguf::GgufFile::open(model_dir)?);
        }
        let config_path = model_dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("{}: invalid JSON", config_path.display()))?,
            Err(_) => serde_json::Value::Null,
        };
        let token = |key: &str| -> String {
            match &config[key] {
                serde_json::Value::String(s) => s.clone(),
                v => v["content"].as_str().unwrap_or_default().to_string(),
            }
        };
        let jinja = model_dir.join("chat_template.jinja");
        let (source, origin) = match &config["chat_template"] {
            serde_json::Value::String(s) => (s.clone(), config_path.display().to_string()),
            serde_json::Value::Array(named) => {
                let default = named
                    .iter()
                    .find(|t| t["name"] == "default")
                    .or(named.first());
                let text = default
                    .and_then(|t| t["template"].as_str())
                    .unwrap_or_default();
                (text.to_string(), config_path.display().to_string())
            }
            _ if jinja.exists() => (
                std::fs::read_to_string(&jinja)?,
                jinja.display().to_string(),
            ),
            _ => bail!(
                "{}: no field `chat_template` (and no chat_template.jinja); use template = \"alpaca\"",
                config_path.display()
            ),
        };
        let template = Self {
            source,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            origin,
        };
        template.render(&[Message::new("user", "x")], true)?;
        Ok(template)
    }

    /// `tokenizer.chat_template` of a GGUF file, its BOS and EOS strings from the vocabulary.
    pub fn from_gguf(file: &crate::gguf::GgufFile) -> Result<Self> {
        let origin = format!("{}: `tokenizer.chat_template`", file.path().display());
        let source = file
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .with_context(|| format!("{origin} is missing; use template = \"alpaca\""))?;
        let token = |key: &str| file.token_text(key).unwrap_or_default();
        let template = Self {
            source: source.to_string(),
            bos_token: token("tokenizer.ggml.bos_token_id"),
            eos_token: token("tokenizer.ggml.eos_token_id"),
            origin,
        };
        template.render(&[Message::new("user", "x")], true)?;
        Ok(template)
    }

    /// The Jinja source, as the model ships it.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` as transformers' `apply_chat_template(..., tokenize=False)` does.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks, and Python string methods.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", &self.source)
            .with_context(|| format!("{}: invalid chat_template", self.origin))?;
        let context = minijinja::context! {
            messages => messages,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            add_generation_prompt => add_generation_prompt,
        };
        env.get_template("chat")
            .and_then(|t| t.render(context))
            .with_context(|| format!("{}: chat_template failed to render", self.origin))
    }

    /// Cuts a conversation into segments: each assistant turn is the text the template adds
    /// between the generation prompt before it and the conversation up to and including it.
    fn segments(&self, messages: &[Message]) -> Result<Vec<Segment>> {
        let mut segments = Vec::new();
        let mut done = String::new();
        for k in (0..messages.len()).filter(|&k| messages[k].role == "assistant") {
            let prompt = self
                .render(&messages[..k], true)
                .with_context(|| format!("the turns before turn {k}"))?;
            let full = self
                .render(&messages[..=k], false)
                .with_context(|| format!("the turns through turn {k}"))?;
            if !prompt.starts_with(&done) || !full.starts_with(&prompt) {
                bail!(
                    "{}: chat_template does not render turn {k} as an extension of the turns before it",
                    self.origin
                );
            }
            segments.push(Segment::context(&prompt[done.len()..]));
            segments.push(Segment::response(&full[prompt.len()..]));
            done = full;
        }
        let all = self.render(messages, false)?;
        if let Some(rest) = all.strip_prefix(&done).filter(|r| !r.is_empty()) {
            segments.push(Segment::context(rest));
        }
        Ok(segments)
    }
}
