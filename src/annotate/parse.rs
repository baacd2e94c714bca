//! Reading a score out of a model's reply: a bare number, a number inside text, or JSON.
//!
//! Replies quote the scale ("on a scale of 1 to 10", "70-99 for social contexts", "8/10"), so
//! the first number is often a bound, not the score. The rule: a JSON `score`/`uncertainty`
//! field; else the last line that is only a number; else the last number once quoted ranges
//! and "/N" or "out of N" denominators are set aside. The score must be finite and on the scale.

use std::sync::LazyLock;

use regex::Regex;

const NUM: &str = r"\d+(?:\.\d+)?";

static NUMBER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?").expect("static pattern"));
static RANGE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(
        r"(?i)between\s+{NUM}\s+and\s+{NUM}|{NUM}\s*(?:-|–|—|to)\s*{NUM}"
    ))
    .expect("static pattern")
});
static DENOMINATOR: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(r"(?i)(?:/|\bout\s+of)\s*{NUM}")).expect("static pattern")
});

/// The score in `reply`, if it holds one on the scale `[min, max]`.
pub fn parse_score(reply: &str, scale: [f64; 2]) -> Option<f64> {
    let text = reply.trim();
    if let Ok(serde_json::Value::Object(obj)) = serde_json::from_str::<serde_json::Value>(text) {
        let v = obj.get("score").or_else(|| obj.get("uncertainty"))?;
        let score = v.as_f64().or_else(|| v.as_str()?.trim().parse().ok())?;
        return on_scale(score, scale);
    }
    let alone = text.lines().rev().find_map(|line| {
        let bare = line
            .trim()
            .trim_matches(|c: char| "*_`.#:".contains(c))
            .trim();
        NUMBER
            .find(bare)
            .filter(|m| m.start() == 0 && m.end() == bare.len())
            .map(|m| m.as_str().to_string())
    });
    let number = match alone {
        Some(n) => n,
        None => {
            let blank = |t: &str, re: &Regex| re.replace_all(t, " ").into_owned();
            let rest = blank(&blank(text, &RANGE), &DENOMINATOR);
            NUMBER.find_iter(&rest).last()?.as_str().to_string()
        }
    };
    on_scale(number.parse().ok()?, scale)
}

fn on_scale(score: f64, [min, max]: [f64; 2]) -> Option<f64> {
    (score.is_finite() && (min..=max).contains(&score)).then_some(score)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UAL: [f64; 2] = crate::uncertainty::UAL_SCALE;
    const PAPER: [f64; 2] = crate::uncertainty::PAPER_SCALE;

    #[test]
    fn reads_bare_numbers_text_and_json() {
        let p = |r: &str| parse_score(r, UAL);
        assert_eq!(p("7"), Some(7.0));
        assert_eq!(p(" 3\n"), Some(3.0));
        assert_eq!(p("Score: 8 (open-ended)"), Some(8.0));
        assert_eq!(p("I would rate this a 2 out of 10."), Some(2.0));
        assert_eq!(p(r#"{"score": 9}"#), Some(9.0));
        assert_eq!(p(r#"{"uncertainty": "4"}"#), Some(4.0));
        assert_eq!(p("5.5"), Some(5.5));
        assert_eq!(
            p("On a scale of 1 to 10, I would rate this an 8."),
            Some(8.0)
        );
        assert_eq!(p("8/10"), Some(8.0));
        assert_eq!(p("Between 1 and 10: this is a 3."), Some(3.0));
    }

    #[test]
    fn reads_the_authors_scale() {
        let p = |r: &str| parse_score(r, PAPER);
        assert_eq!(p("0"), Some(0.0), "0 is a valid score on 0–99");
        assert_eq!(p("99"), Some(99.0));
        assert_eq!(p("100"), None);
        assert_eq!(
            p(
                "The dialogue is technical (0-39 band): strict precision is needed.\n\n**Score: 15**"
            ),
            Some(15.0)
        );
        assert_eq!(
            p("Rating: 85\nThis falls in the 70–99 range for everyday conversation."),
            Some(85.0)
        );
        assert_eq!(
            p("I'd rate the need for diversity at 42 out of 99."),
            Some(42.0)
        );
    }

    #[test]
    fn rejects_garbage_and_out_of_range() {
        let p = |r: &str| parse_score(r, UAL);
        assert_eq!(p("I cannot answer that."), None);
        assert_eq!(p("11"), None);
        assert_eq!(p("0"), None);
        assert_eq!(p("1e400"), None, "non-finite");
        assert_eq!(p(r#"{"answer": 3}"#), None);
        assert_eq!(p(""), None);
    }
}
