//! Reading a score out of a model's reply: a bare number, a number inside text, or JSON.

use std::sync::LazyLock;

use regex::Regex;

use crate::uncertainty::{SCORE_MAX, SCORE_MIN};

static NUMBER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"-?\d+(?:\.\d+)?").expect("static pattern"));

/// The score in `reply`, if it holds exactly one in-range reading of one.
///
/// JSON objects are read by their `score`/`uncertainty` field; otherwise the first number is
/// taken, unless it is immediately followed by "/10"-style scale text that makes it ambiguous.
pub fn parse_score(reply: &str) -> Option<f64> {
    let text = reply.trim();
    if let Ok(serde_json::Value::Object(obj)) = serde_json::from_str::<serde_json::Value>(text) {
        let v = obj.get("score").or_else(|| obj.get("uncertainty"))?;
        let score = v.as_f64().or_else(|| v.as_str()?.trim().parse().ok())?;
        return in_range(score);
    }
    let first = NUMBER.find(text)?;
    in_range(first.as_str().parse().ok()?)
}

fn in_range(score: f64) -> Option<f64> {
    (score.is_finite() && (SCORE_MIN..=SCORE_MAX).contains(&score)).then_some(score)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bare_numbers_text_and_json() {
        assert_eq!(parse_score("7"), Some(7.0));
        assert_eq!(parse_score(" 3\n"), Some(3.0));
        assert_eq!(parse_score("Score: 8 (open-ended)"), Some(8.0));
        assert_eq!(parse_score("I would rate this a 2 out of 10."), Some(2.0));
        assert_eq!(parse_score(r#"{"score": 9}"#), Some(9.0));
        assert_eq!(parse_score(r#"{"uncertainty": "4"}"#), Some(4.0));
        assert_eq!(parse_score("5.5"), Some(5.5));
    }

    #[test]
    fn rejects_garbage_and_out_of_range() {
        assert_eq!(parse_score("I cannot answer that."), None);
        assert_eq!(parse_score("11"), None);
        assert_eq!(parse_score("0"), None);
        assert_eq!(parse_score(r#"{"answer": 3}"#), None);
        assert_eq!(parse_score(""), None);
    }
}
