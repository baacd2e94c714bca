//! The authors' maths evaluations (`benchmark/math_bench.py` in their code; `UAL-PAPER.md`):
//! GSM8K and MetaMath, 0-shot, sampled, scored by a substring rule.
//!
//! - Prompt: `"Here are some questions and answers about math:\n\n"` then the question in a
//!   `# Question:` block, wrapped in their Vicuna turn (`"\n\n### User: … ### Assistant: "`),
//!   encoded with BOS and cut to its last 512 tokens.
//! - Decoding: temperature 0.8, top-k 200, 256 new tokens, until EOS.
//! - Correct if the gold answer is a substring of the generated text. GSM8K's gold is the text
//!   after `####`; MetaMath's is the last word of the response, stripped of spaces and dots.
//!
//! ual's own GSM8K protocol (greedy, exact match of the extracted number) is `super::gsm8k`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;

use crate::data::template::vicuna_prompt;
use crate::model::Pretrained;
use crate::model::generate::GenerationConfig;

/// The authors' sampling settings.
pub const TEMPERATURE: f64 = 0.8;
/// The authors' top-k.
pub const TOP_K: usize = 200;
/// The authors' answer length.
pub const MAX_NEW_TOKENS: usize = 256;
/// The prompt keeps its last this many tokens (`encoded[-max_tokens:]`).
pub const MAX_PROMPT_TOKENS: usize = 512;

/// A question and the text whose presence in the output counts as correct.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MathItem {
    /// The question.
    pub question: String,
    /// The reference answer.
    pub gold: String,
}

/// GSM8K's gold answer as the authors read it: `answer.rsplit('####', 1)[1].strip()`.
pub fn gsm8k_gold(answer: &str) -> Option<String> {
    answer
        .rsplit_once("####")
        .map(|(_, tail)| tail.trim().to_string())
}

/// MetaMath's gold answer as the authors read it: `response.strip(' .').split()[-1]`.
pub fn metamath_gold(response: &str) -> Option<String> {
    response
        .trim_matches(|c| c == ' ' || c == '.')
        .split_whitespace()
        .last()
        .map(str::to_string)
}

/// The authors' rule: correct when the gold text occurs anywhere in the output.
pub fn is_correct(gold: &str, output: &str) -> bool {
    output.contains(gold)
}

/// The prompt text the authors' `generate_inputs` builds for a 0-shot question.
pub fn math_prompt(question: &str) -> String {
    let instruction = format!(
        "Here are some questions and answers about math:\n\n\n# Question:\n```\n{question}\n```\n"
    );
    vicuna_prompt("\n\n", &instruction)
}

/// GSM8K lines (`{"question", "answer"}`).
pub fn read_gsm8k(path: &Path) -> Result<Vec<MathItem>> {
    read_records(path)?
        .into_iter()
        .map(|(line, record)| {
            let question = field(&record, "question", path, line)?;
            let answer = field(&record, "answer", path, line)?;
            let gold = gsm8k_gold(&answer).with_context(|| {
                format!(
                    "{}:{line}: field `answer` has no `####` gold",
                    path.display()
                )
            })?;
            Ok(MathItem { question, gold })
        })
        .collect()
}

/// MetaMathQA records (`{"query", "response"}`), as JSONL or as the JSON array it ships as.
pub fn read_metamath(path: &Path) -> Result<Vec<MathItem>> {
    read_records(path)?
        .into_iter()
        .map(|(line, record)| {
            let question = field(&record, "query", path, line)?;
            let response = field(&record, "response", path, line)?;
            let gold = metamath_gold(&response)
                .with_context(|| format!("{}:{line}: field `response` is empty", path.display()))?;
            Ok(MathItem { question, gold })
        })
        .collect()
}

/// `(line or array position, object)` of each record.
fn read_records(path: &Path) -> Result<Vec<(usize, Value)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    if text.trim_start().starts_with('[') {
        let Value::Array(items) = serde_json::from_str(&text)
            .with_context(|| format!("{}: malformed JSON", path.display()))?
        else {
            bail!("{}: expected a JSON array", path.display());
        };
        return Ok(items
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i + 1, v))
            .collect());
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map(|v| (i + 1, v))
                .with_context(|| format!("{}:{}: malformed JSON", path.display(), i + 1))
        })
        .collect()
}

fn field(record: &Value, name: &str, path: &Path, line: usize) -> Result<String> {
    match &record[name] {
        Value::String(s) => Ok(s.clone()),
        Value::Null => bail!("{}:{line}: missing field `{name}`", path.display()),
        _ => bail!("{}:{line}: field `{name}` must be a string", path.display()),
    }
}

/// One evaluated question.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Record {
    /// The question.
    pub question: String,
    /// The reference answer.
    pub gold: String,
    /// What the model wrote.
    pub output: String,
    /// Whether the reference occurs in it.
    pub correct: bool,
}

/// The authors' maths report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Which protocol ran.
    pub protocol: &'static str,
    /// The test file.
    pub data: String,
    /// Item i sampled from seed + i.
    pub seed: u64,
    /// Sampling temperature.
    pub temperature: f64,
    /// Sampling top-k.
    pub top_k: usize,
    /// The answer length.
    pub max_new_tokens: usize,
    /// The items and how many were right.
    #[serde(flatten)]
    pub graded: super::Graded<Record>,
}

/// Samples one answer per item as the authors do; item i draws from `seed + i`, so a run is
/// reproducible and its items independent of each other, at any `batch` (prompts decoded
/// together).
pub fn evaluate(
    model: &Pretrained,
    items: &[MathItem],
    seed: u64,
    batch: usize,
    data_name: &str,
) -> Result<Report> {
    if items.is_empty() {
        bail!("{data_name}: no items to evaluate");
    }
    let config = GenerationConfig {
        max_new_tokens: MAX_NEW_TOKENS,
        temperature: TEMPERATURE,
        top_k: TOP_K,
        seed,
        ..Default::default()
    };
    let prompt_ids = |item: &MathItem| -> Result<Vec<u32>> {
        let mut ids = model.tokenizer.encode(&math_prompt(&item.question))?;
        if ids.len() > MAX_PROMPT_TOKENS {
            ids.drain(..ids.len() - MAX_PROMPT_TOKENS);
        }
        Ok(ids)
    };
    let graded = super::grade_all(items, batch, |first, chunk| {
        let prompts = chunk.iter().map(prompt_ids).collect::<Result<Vec<_>>>()?;
        let generations = model.continue_batch(&prompts, first, &config)?;
        let graded = chunk.iter().zip(generations).map(|(item, generation)| {
            let output = generation.text.trim().to_string();
            let correct = is_correct(&item.gold, &output);
            let record = Record {
                correct,
                question: item.question.clone(),
                gold: item.gold.clone(),
                output,
            };
            (record, correct)
        });
        Ok(graded.collect())
    })?;
    Ok(Report {
        protocol: "paper",
        data: data_name.to_string(),
        seed,
        temperature: TEMPERATURE,
        top_k: TOP_K,
        max_new_tokens: MAX_NEW_TOKENS,
        graded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gold_answers_are_read_as_the_authors_read_them() {
        // A real GSM8K answer (train split): the gold is the text after ####, stripped.
        let natalia = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72";
        assert_eq!(gsm8k_gold(natalia).as_deref(), Some("72"));
        assert_eq!(gsm8k_gold("#### 1,200 ").as_deref(), Some("1,200"));
        assert_eq!(gsm8k_gold("no marker"), None);
        // MetaMathQA responses end "The answer is: 18" (sometimes with a full stop).
        let r = "Janet sells 16 - 3 - 4 = 9 duck eggs.\nThe answer is: 18";
        assert_eq!(metamath_gold(r).as_deref(), Some("18"));
        assert_eq!(
            metamath_gold("The answer is: \\frac{1}{2}. ").as_deref(),
            Some("\\frac{1}{2}")
        );
        assert_eq!(metamath_gold("  .. "), None);
    }

    #[test]
    fn correct_means_the_gold_is_a_substring() {
        assert!(is_correct("72", "She sold 72 clips."));
        // The authors' rule counts any occurrence, even inside another number.
        assert!(is_correct("72", "1720"));
        assert!(!is_correct("72", "seventy-two"));
        assert!(is_correct("1,200", "It costs 1,200 dollars"));
        assert!(!is_correct("1,200", "It costs 1200 dollars"));
    }

    #[test]
    fn the_prompt_is_the_authors_template() {
        assert_eq!(
            math_prompt("What is 2+2?"),
            "\n\n### User: Here are some questions and answers about math:\n\n\n# Question:\n```\nWhat is 2+2?\n```\n\n\n### Assistant: "
        );
    }
}
