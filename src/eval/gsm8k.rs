//! GSM8K with ual's protocol: exact-match accuracy of greedy answers in the training template.
//! The authors' protocol (sampled, substring match) is `super::paper`.

use std::path::Path;
use std::sync::LazyLock;

use anyhow::{Context, Result, bail};
use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::data::formats::Message;
use crate::data::template::Template;
use crate::model::Pretrained;
use crate::model::generate::GenerationConfig;

/// One GSM8K item as the dataset ships it.
#[derive(Debug, Clone, Deserialize)]
pub struct Item {
    /// The problem.
    pub question: String,
    /// The worked solution, ending `#### N`.
    pub answer: String,
}

/// One evaluated item.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// The problem.
    pub question: String,
    /// The reference answer.
    pub gold: String,
    /// What the model wrote.
    pub prediction: String,
    /// The final number found in it.
    pub extracted: Option<String>,
    /// Whether it equals the reference.
    pub correct: bool,
}

/// ual's GSM8K report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The test file.
    pub data: String,
    /// Worked examples shown before each question.
    pub shots: usize,
    /// The items and how many were right.
    #[serde(flatten)]
    pub graded: super::Graded<Record>,
}

static NUMBER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"-?\$?\d[\d,]*(?:\.\d+)?").expect("static pattern"));

/// The final answer of a solution: the number after `####`, else the last number in the text,
/// normalised (no `$`, no thousands commas, no trailing `.0`).
pub fn extract_answer(text: &str) -> Option<String> {
    let tail = text.rsplit_once("####").map(|(_, t)| t);
    let found = match tail {
        Some(t) => NUMBER.find(t).or_else(|| NUMBER.find_iter(text).last()),
        None => NUMBER.find_iter(text).last(),
    };
    found.map(|m| normalise(m.as_str()))
}

fn normalise(number: &str) -> String {
    let mut n: String = number.chars().filter(|c| !matches!(c, '$' | ',')).collect();
    if n.contains('.') {
        n = n.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    if n == "-0" { "0".into() } else { n }
}

/// GSM8K-format JSONL; errors name the line and field.
pub fn read_items(path: &Path) -> Result<Vec<Item>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| {
                format!(
                    "{}:{}: expected {{\"question\", \"answer\"}}",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

/// Greedy answers to `items`, `batch` decoded together, prompted in `template` with the
/// `exemplars` as worked examples in earlier turns.
pub fn evaluate(
    model: &Pretrained,
    template: &Template,
    items: &[Item],
    exemplars: &[Item],
    max_new_tokens: usize,
    batch: usize,
    data_name: &str,
) -> Result<Report> {
    if items.is_empty() {
        bail!("{data_name}: no items to evaluate");
    }
    let config = GenerationConfig {
        max_new_tokens,
        stop: vec!["\n\n###".into()],
        ..Default::default()
    };
    let prompt_ids = |item: &Item| -> Result<Vec<u32>> {
        let mut messages = Vec::new();
        for shot in exemplars {
            messages.push(Message::new("user", &shot.question));
            messages.push(Message::new("assistant", &shot.answer));
        }
        messages.push(Message::new("user", &item.question));
        let prompt = template.prompt(&messages)?;
        model
            .tokenizer
            .encode_with(&prompt, !template.prompt_has_special_tokens())
    };
    let graded = super::grade_all(items, batch, |first, chunk| {
        let prompts = chunk.iter().map(prompt_ids).collect::<Result<Vec<_>>>()?;
        let generations = model.continue_batch(&prompts, first, &config)?;
        chunk
            .iter()
            .zip(generations)
            .map(|(item, generation)| {
                let prediction = generation.text;
                let gold = extract_answer(&item.answer)
                    .with_context(|| format!("{data_name}: gold answer without a number"))?;
                let extracted = extract_answer(&prediction);
                let correct = extracted.as_deref() == Some(gold.as_str());
                let record = Record {
                    question: item.question.clone(),
                    gold,
                    prediction,
                    extracted,
                    correct,
                };
                Ok((record, correct))
            })
            .collect()
    })?;
    Ok(Report {
        data: data_name.to_string(),
        shots: exemplars.len(),
        graded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_gsm8k_gold_answers() {
        // Real GSM8K answers (train split).
        let natalia = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72";
        assert_eq!(extract_answer(natalia).as_deref(), Some("72"));
        let weng = "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10";
        assert_eq!(extract_answer(weng).as_deref(), Some("10"));
        assert_eq!(
            extract_answer("... so the total is\n#### 1,200").as_deref(),
            Some("1200")
        );
    }

    #[test]
    fn extracts_from_messy_model_output() {
        assert_eq!(
            extract_answer("The answer is $1,234.50.").as_deref(),
            Some("1234.5")
        );
        assert_eq!(
            extract_answer("She has 3 apples, then 5, so 8.00 in total").as_deref(),
            Some("8")
        );
        assert_eq!(extract_answer("#### -7 dollars").as_deref(), Some("-7"));
        assert_eq!(
            extract_answer("#### \nso 12 + 3 = 15").as_deref(),
            Some("12")
        );
        assert_eq!(extract_answer("no digits here"), None);
        assert_eq!(
            extract_answer("x = 1.0, y = 2.50\n#### $3,000.000").as_deref(),
            Some("3000")
        );
    }
}
