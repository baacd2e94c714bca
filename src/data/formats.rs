//! The JSONL training schemas (DESIGN §4), one example per line.
//!
//! - Alpaca: `{"instruction", "input"?, "output"}`
//! - chat: `{"messages": [{"role", "content"}, ...]}`, loss on the assistant turns only
//! - completion: `{"prompt", "completion"}`
//!
//! Each may carry `"uncertainty": number`. Unknown fields are ignored. Every error names the
//! file, the line and the field.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Map, Value};

use crate::uncertainty::check_score;

/// One training example, before templating and tokenisation.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub body: Body,
    /// The elicited uncertainty score, if the line carries one.
    pub uncertainty: Option<f64>,
    /// 1-based line number in its file, for error messages.
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Alpaca {
        instruction: String,
        input: String,
        output: String,
    },
    Chat {
        messages: Vec<Message>,
    },
    Completion {
        prompt: String,
        completion: String,
    },
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// Reads every non-blank line of a JSONL file.
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| parse_line(l, i + 1).with_context(|| format!("{}:{}", path.display(), i + 1)))
        .collect()
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
            check_score(score).map_err(|e| anyhow!("field `uncertainty`: {e}"))?;
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
            messages: messages_of(messages)?,
        }
    } else {
        bail!(
            "missing field: expected `instruction` and `output`, `messages`, or `prompt` and `completion`"
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
    if !messages.iter().any(|m| m.role == "assistant") {
        bail!("field `messages` has no assistant turn, so nothing to learn from");
    }
    Ok(messages)
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
    fn errors_name_the_field() {
        let msg = |l: &str| format!("{:#}", parse_line(l, 1).unwrap_err());
        assert!(msg(r#"{"instruction":"x"}"#).contains("`output`"));
        assert!(msg(r#"{"prompt":"x","completion":3}"#).contains("`completion` must be a string"));
        assert!(
            msg(r#"{"prompt":"x","completion":"y","uncertainty":12}"#).contains("`uncertainty`")
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
