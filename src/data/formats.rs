//! The JSONL training schemas (ARCHITECTURE §4), one example per line.
//!
//! - Alpaca: `{"instruction", "input"?, "output"}`
//! - chat: `{"messages": [{"role", "content"}, ...]}`, loss on the assistant turns only
//! - completion: `{"prompt", "completion"}`
//! - ShareGPT: `{"conversations": [...]}`, either alternating strings (user first, as in LIMA)
//!   or `[{"from", "value"}]` turns (as in Deita); read as a chat
//!
//! Each may carry `"uncertainty": number`; whether it lies on the elicitation scale is the
//! mapping's check (`crate::uncertainty`), since the scale is configured. Unknown fields are
//! ignored. Every error names the file, the line and the field.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Map, Value};

/// One training example, before templating and tokenisation.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// What the line holds.
    pub body: Body,
    /// The elicited uncertainty score, if the line carries one.
    pub uncertainty: Option<f64>,
    /// 1-based line number in its file, for error messages.
    pub line: usize,
}

/// The three training schemas.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// `{"instruction", "input", "output"}`.
    Alpaca {
        /// The task.
        instruction: String,
        /// Its input; empty when there is none.
        input: String,
        /// The reference response.
        output: String,
    },
    /// `{"messages": [{"role", "content"}, ..]}` or ShareGPT's `conversations`.
    Chat {
        /// The turns, in order.
        messages: Vec<Message>,
    },
    /// `{"prompt", "completion"}`, used as it is, without a template.
    Completion {
        /// The text before the response.
        prompt: String,
        /// The response.
        completion: String,
    },
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The turn's text.
    pub content: String,
}

impl Message {
    /// A turn of `role` saying `content`.
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// Reads every non-blank line of a JSONL file.
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    text_lines(path)?
        .into_iter()
        .map(|(n, l)| parse_line(&l, n).with_context(|| format!("{}:{n}", path.display())))
        .collect()
}

/// Each example's 0-based position among the file's examples, by its line number.
pub fn line_index(examples: &[Example]) -> HashMap<usize, usize> {
    examples
        .iter()
        .enumerate()
        .map(|(i, e)| (e.line, i))
        .collect()
}

/// The prompt of every non-blank line, for runs that need no response: a JSON string, or an
/// object with `instruction` (and `input`), `prompt`, `conversations` (its first turn, as in
/// LIMA's test split) or `messages` (its first user turn).
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    text_lines(path)?
        .into_iter()
        .map(|(n, l)| prompt_of(&l).with_context(|| format!("{}:{n}", path.display())))
        .collect()
}

/// The non-blank lines of a text file with their 1-based numbers. A UTF-8 byte-order mark is
/// skipped; a line that is not UTF-8 is an error naming the line and the byte.
pub fn text_lines(path: &Path) -> Result<Vec<(usize, String)>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let mut lines = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let text = std::str::from_utf8(line).map_err(|e| {
            anyhow!(
                "{}:{}: invalid UTF-8 at byte {} of the line",
                path.display(),
                i + 1,
                e.valid_up_to() + 1
            )
        })?;
        if !text.trim().is_empty() {
            lines.push((i + 1, text.trim_end_matches('\r').to_string()));
        }
    }
    Ok(lines)
}

fn prompt_of(line: &str) -> Result<String> {
    let value: Value = serde_json::from_str(line).map_err(|e| anyhow!("malformed JSON: {e}"))?;
    let obj = match value {
        Value::String(s) => return Ok(s),
        Value::Object(obj) => obj,
        _ => bail!("expected a JSON object or string"),
    };
    if obj.contains_key("instruction") {
        return Ok(user_text(
            &string(&obj, "instruction")?,
            &optional_string(&obj, "input")?,
        ));
    }
    if obj.contains_key("prompt") {
        return string(&obj, "prompt");
    }
    let first_user = |turns: &Value, field: &str| -> Result<String> {
        let Value::Array(items) = turns else {
            bail!("field `{field}` must be an array");
        };
        items
            .iter()
            .find_map(|t| match t {
                Value::String(s) => Some(s.clone()),
                Value::Object(o)
                    if matches!(
                        o.get("from").or(o.get("role")).and_then(Value::as_str),
                        Some("human" | "user")
                    ) =>
                {
                    o.get("value")
                        .or(o.get("content"))
                        .and_then(Value::as_str)
                        .map(str::to_string)
                }
                _ => None,
            })
            .ok_or_else(|| anyhow!("field `{field}` has no user turn"))
    };
    if let Some(turns) = obj.get("conversations") {
        return first_user(turns, "conversations");
    }
    if let Some(turns) = obj.get("messages") {
        return first_user(turns, "messages");
    }
    bail!("missing field: expected `instruction`, `prompt`, `conversations` or `messages`")
}

/// A prompt to answer: its example (the response, if any, unused) and every field of its
/// item, which AlpacaEval's output keeps (`dataset`, ids).
#[derive(Debug, Clone)]
pub struct PromptLine {
    /// The prompt as an example of its schema.
    pub example: Example,
    /// The item's fields (empty for a bare string).
    pub fields: Map<String, Value>,
}

/// The prompts of a JSONL file, or of a JSON array such as AlpacaEval's `alpaca_eval.json`:
/// every schema training reads with its response optional (user-only `messages`, `instruction`
/// without `output`, `prompt` without `completion`), and bare strings. Errors name the file and
/// the line (or the array's item).
pub fn read_prompt_lines(path: &Path) -> Result<Vec<PromptLine>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    if text.trim_start().starts_with('[') {
        let items: Vec<Value> = serde_json::from_str(text)
            .map_err(|e| anyhow!("{}: malformed JSON array: {e}", path.display()))?;
        return items
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                prompt_line(v, i + 1).with_context(|| format!("{}: item {}", path.display(), i + 1))
            })
            .collect();
    }
    text_lines(path)?
        .into_iter()
        .map(|(n, l)| {
            let value = serde_json::from_str(&l).map_err(|e| anyhow!("malformed JSON: {e}"));
            value
                .and_then(|v| prompt_line(v, n))
                .with_context(|| format!("{}:{n}", path.display()))
        })
        .collect()
}

fn prompt_line(value: Value, number: usize) -> Result<PromptLine> {
    let obj = match value {
        Value::String(s) => {
            return Ok(PromptLine {
                example: Example {
                    body: Body::Alpaca {
                        instruction: s,
                        input: String::new(),
                        output: String::new(),
                    },
                    uncertainty: None,
                    line: number,
                },
                fields: Map::new(),
            });
        }
        Value::Object(obj) => obj,
        _ => bail!("expected a JSON object or string"),
    };
    let body = if obj.contains_key("instruction") {
        Body::Alpaca {
            instruction: string(&obj, "instruction")?,
            input: optional_string(&obj, "input")?,
            output: optional_string(&obj, "output")?,
        }
    } else if obj.contains_key("prompt") {
        Body::Completion {
            prompt: string(&obj, "prompt")?,
            completion: optional_string(&obj, "completion")?,
        }
    } else if let Some(messages) = obj.get("messages") {
        Body::Chat {
            messages: messages_of(messages)?,
        }
    } else if let Some(turns) = obj.get("conversations") {
        Body::Chat {
            messages: sharegpt_turns(turns)?,
        }
    } else {
        bail!(
            "missing field: expected `instruction`, `messages`, `conversations` or `prompt`, or a JSON string"
        );
    };
    if let Body::Chat { messages } = &body
        && !messages.iter().any(|m| m.role == "user")
    {
        bail!("the conversation has no user turn to answer");
    }
    Ok(PromptLine {
        example: Example {
            body,
            uncertainty: None,
            line: number,
        },
        fields: obj,
    })
}

/// Parses one line; the caller adds the file and line to errors.
pub fn parse_line(line: &str, number: usize) -> Result<Example> {
    let value: Value = serde_json::from_str(line).map_err(|e| anyhow!("malformed JSON: {e}"))?;
    let Value::Object(obj) = value else {
        bail!("expected a JSON object");
    };
    let uncertainty = match obj.get("uncertainty") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let score = v
                .as_f64()
                .ok_or_else(|| anyhow!("field `uncertainty` must be a number"))?;
            if !score.is_finite() {
                bail!("field `uncertainty` must be a finite number");
            }
            Some(score)
        }
    };
    let body = if obj.contains_key("instruction") || obj.contains_key("output") {
        Body::Alpaca {
            instruction: string(&obj, "instruction")?,
            input: optional_string(&obj, "input")?,
            output: string(&obj, "output")?,
        }
    } else if obj.contains_key("prompt") || obj.contains_key("completion") {
        Body::Completion {
            prompt: string(&obj, "prompt")?,
            completion: string(&obj, "completion")?,
        }
    } else if let Some(messages) = obj.get("messages") {
        Body::Chat {
            messages: with_assistant(messages_of(messages)?, "messages")?,
        }
    } else if let Some(turns) = obj.get("conversations") {
        Body::Chat {
            messages: with_assistant(sharegpt_turns(turns)?, "conversations")?,
        }
    } else {
        bail!(
            "missing field: expected `instruction` and `output`, `messages`, `conversations`, or `prompt` and `completion`"
        );
    };
    Ok(Example {
        body,
        uncertainty,
        line: number,
    })
}

fn messages_of(value: &Value) -> Result<Vec<Message>> {
    let Value::Array(items) = value else {
        bail!("field `messages` must be an array of {{\"role\", \"content\"}} objects");
    };
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::Object(turn) = item else {
            bail!("field `messages[{i}]` must be an object");
        };
        let field = |name: &str| string(turn, name).map_err(|e| anyhow!("`messages[{i}]`: {e}"));
        let role = field("role")?;
        if !matches!(role.as_str(), "system" | "user" | "assistant") {
            bail!("field `messages[{i}].role` is {role:?}; expected system, user or assistant");
        }
        messages.push(Message {
            role,
            content: field("content")?,
        });
    }
    Ok(messages)
}

/// Training needs an assistant turn to learn from.
fn with_assistant(messages: Vec<Message>, field: &str) -> Result<Vec<Message>> {
    if !messages.iter().any(|m| m.role == "assistant") {
        bail!("field `{field}` has no assistant turn, so nothing to learn from");
    }
    Ok(messages)
}

/// ShareGPT's `conversations`: strings alternate user and assistant, starting with the user;
/// `{"from", "value"}` turns name their speaker (`human`/`user`, `gpt`/`assistant`, `system`).
fn sharegpt_turns(value: &Value) -> Result<Vec<Message>> {
    let Value::Array(items) = value else {
        bail!(
            "field `conversations` must be an array of strings or of {{\"from\", \"value\"}} objects"
        );
    };
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let message = match item {
            Value::String(text) => {
                let role = if messages
                    .iter()
                    .filter(|m: &&Message| m.role != "system")
                    .count()
                    % 2
                    == 0
                {
                    "user"
                } else {
                    "assistant"
                };
                Message::new(role, text)
            }
            Value::Object(turn) => {
                let field = |name: &str| {
                    string(turn, name).map_err(|e| anyhow!("`conversations[{i}]`: {e}"))
                };
                let from = field("from")?;
                let role = match from.as_str() {
                    "human" | "user" => "user",
                    "gpt" | "assistant" | "chatgpt" | "bard" | "bing" => "assistant",
                    "system" => "system",
                    other => bail!(
                        "field `conversations[{i}].from` is {other:?}; expected human, gpt or system"
                    ),
                };
                Message::new(role, &field("value")?)
            }
            _ => bail!(
                "field `conversations[{i}]` must be a string or a {{\"from\", \"value\"}} object"
            ),
        };
        messages.push(message);
    }
    Ok(messages)
}

/// The conversation's turns joined with newlines, without speakers: the sample text of the
/// authors' elicitation prompt (`"\n".join(sample['conversations'])`).
pub fn plain_text(body: &Body) -> String {
    match body {
        Body::Alpaca {
            instruction,
            input,
            output,
        } => [user_text(instruction, input), output.clone()].join("\n"),
        Body::Chat { messages } => messages
            .iter()
            .filter(|m| m.role != "system")
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        Body::Completion { prompt, completion } => format!("{prompt}\n{completion}"),
    }
}

/// The response a line teaches: an Alpaca output, a completion, or the last assistant turn
/// (`None` for a conversation without one).
pub fn response_text(body: &Body) -> Option<&str> {
    match body {
        Body::Alpaca { output, .. } => Some(output),
        Body::Completion { completion, .. } => Some(completion),
        Body::Chat { messages } => messages
            .iter()
            .rev()
            .find(|m| m.role == "assistant")
            .map(|m| m.content.as_str()),
    }
}

/// An Alpaca instruction and its optional input as one user turn.
pub fn user_text(instruction: &str, input: &str) -> String {
    if input.trim().is_empty() {
        instruction.to_string()
    } else {
        format!("{instruction}\n\n{input}")
    }
}

fn string(obj: &Map<String, Value>, field: &str) -> Result<String> {
    match obj.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => bail!("field `{field}` must be a string"),
        None => bail!("missing field `{field}`"),
    }
}

fn optional_string(obj: &Map<String, Value>, field: &str) -> Result<String> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(_) => string(obj, field),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_each_schema() {
        let a = parse_line(
            r#"{"instruction":"Add","input":"2+2","output":"4","uncertainty":1,"x":0}"#,
            1,
        )
        .unwrap();
        assert!(matches!(a.body, Body::Alpaca { ref input, .. } if input == "2+2"));
        assert_eq!(a.uncertainty, Some(1.0));
        let c = parse_line(r#"{"prompt":"Q","completion":"A"}"#, 2).unwrap();
        assert!(matches!(c.body, Body::Completion { .. }) && c.uncertainty.is_none());
        let m = parse_line(r#"{"messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello"}]}"#, 3).unwrap();
        assert!(matches!(m.body, Body::Chat { ref messages } if messages.len() == 2));
    }

    #[test]
    fn reads_both_sharegpt_shapes() {
        let lima = parse_line(
            r#"{"conversations":["Hi","Hello","How?","Thus."],"uncertainty":0}"#,
            1,
        )
        .unwrap();
        let Body::Chat { messages } = &lima.body else {
            panic!("a chat")
        };
        let roles: Vec<&str> = messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
        assert_eq!(lima.uncertainty, Some(0.0));
        let deita = parse_line(
            r#"{"id":"x","conversations":[{"from":"system","value":"S"},{"from":"human","value":"Q"},{"from":"gpt","value":"A"}]}"#,
            2,
        )
        .unwrap();
        let Body::Chat { messages } = &deita.body else {
            panic!("a chat")
        };
        assert_eq!(messages[0], Message::new("system", "S"));
        assert_eq!(messages[2], Message::new("assistant", "A"));
        assert_eq!(plain_text(&lima.body), "Hi\nHello\nHow?\nThus.");
    }

    #[test]
    fn reads_prompts_of_every_shape() {
        for (line, prompt) in [
            (
                r#"{"conversations":["Why is the sky blue?"]}"#,
                "Why is the sky blue?",
            ),
            (
                r#"{"conversations":[{"from":"human","value":"Q"},{"from":"gpt","value":"A"}]}"#,
                "Q",
            ),
            (r#"{"instruction":"Add","input":"2+2"}"#, "Add\n\n2+2"),
            (r#"{"prompt":"P"}"#, "P"),
            (r#""plain""#, "plain"),
            (
                r#"{"messages":[{"role":"system","content":"S"},{"role":"user","content":"U"}]}"#,
                "U",
            ),
        ] {
            assert_eq!(prompt_of(line).unwrap(), prompt, "{line}");
        }
        assert!(format!("{:#}", prompt_of(r#"{"x":1}"#).unwrap_err()).contains("missing field"));
    }

    #[test]
    fn sharegpt_errors_name_the_field() {
        let msg = |l: &str| format!("{:#}", parse_line(l, 1).unwrap_err());
        assert!(msg(r#"{"conversations":"Hi"}"#).contains("`conversations` must be an array"));
        assert!(msg(r#"{"conversations":["Hi"]}"#).contains("no assistant turn"));
        assert!(
            msg(r#"{"conversations":[{"from":"bot","value":"x"}]}"#)
                .contains("`conversations[0].from`")
        );
        assert!(
            msg(r#"{"conversations":[{"from":"human"}]}"#)
                .contains("`conversations[0]`: missing field `value`")
        );
        assert!(msg(r#"{"conversations":["Q",3]}"#).contains("`conversations[1]`"));
    }

    #[test]
    fn errors_name_the_field() {
        let msg = |l: &str| format!("{:#}", parse_line(l, 1).unwrap_err());
        assert!(msg(r#"{"instruction":"x"}"#).contains("`output`"));
        assert!(msg(r#"{"prompt":"x","completion":3}"#).contains("`completion` must be a string"));
        assert!(
            msg(r#"{"prompt":"x","completion":"y","uncertainty":"a"}"#).contains("`uncertainty`")
        );
        assert!(msg(r#"{"prompt":"x""#).contains("malformed JSON"));
        assert!(msg(r#"[1]"#).contains("object"));
        assert!(
            msg(r#"{"messages":[{"role":"user","content":"x"}]}"#).contains("no assistant turn")
        );
        assert!(
            msg(r#"{"messages":[{"role":"bot","content":"x"}]}"#).contains("`messages[0].role`")
        );
        assert!(
            msg(r#"{"messages":[{"role":"assistant"}]}"#)
                .contains("`messages[0]`: missing field `content`")
        );
    }
}
