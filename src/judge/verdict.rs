//! A judge's reply, read as a verdict, and the two orders of a pair combined into one outcome.

use serde::{Deserialize, Serialize};

/// What the judge said of one order: the answer shown first is better, neither is, or it is
/// worse (the authors' 1, 2 and 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// 1: the first answer is better.
    First,
    /// 2: neither is better.
    Neither,
    /// 3: the first answer is worse.
    Second,
}

impl Verdict {
    /// The verdict a cached score stands for.
    pub fn from_score(score: f64) -> Option<Self> {
        match score as i64 {
            1 => Some(Self::First),
            2 => Some(Self::Neither),
            3 => Some(Self::Second),
            _ => None,
        }
    }

    /// The authors' digit, kept in the cache as the request's score.
    pub fn score(self) -> f64 {
        match self {
            Self::First => 1.0,
            Self::Neither => 2.0,
            Self::Second => 3.0,
        }
    }
}

/// How one prompt's two answers compare, `a` against `b`, over both orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Both orders prefer `a`.
    Win,
    /// The orders disagree, or both call it even.
    Tie,
    /// Both orders prefer `b`.
    Loss,
}

/// The pair's outcome from the verdict with `a` shown first and the one with `b` shown first.
/// A preference that does not survive the swap is position bias, not a preference: a tie.
pub fn combine(a_first: Verdict, b_first: Verdict) -> Outcome {
    let for_a = |v: Verdict, a_shown_first: bool| match (v, a_shown_first) {
        (Verdict::Neither, _) => 0,
        (Verdict::First, true) | (Verdict::Second, false) => 1,
        _ => -1,
    };
    match (for_a(a_first, true), for_a(b_first, false)) {
        (1, 1) => Outcome::Win,
        (-1, -1) => Outcome::Loss,
        _ => Outcome::Tie,
    }
}

/// The verdict in a judge's reply: the first 1, 2 or 3 standing alone after the last
/// "judgment" (any case; the authors' format ends `### Judgment:` then the digit, often in
/// bold), or a reply that is only the digit. Anything else holds none.
pub fn parse_verdict(reply: &str) -> Option<Verdict> {
    let tail = match last_ascii_ci(reply, "judgment").or_else(|| last_ascii_ci(reply, "judgement"))
    {
        Some(at) => &reply[at..],
        None => {
            let bare = reply.trim_matches(|c: char| c.is_whitespace() || "*`#.:()[]".contains(c));
            return digit(bare);
        }
    };
    tail.split(|c: char| !c.is_ascii_alphanumeric() && c != '.')
        .map(|word| word.trim_end_matches('.'))
        .find_map(digit)
}

/// The byte offset of the last occurrence of the ASCII `word` in `text`, in any case. Matched
/// on the bytes of `text` itself: lowercasing first would move offsets wherever a character's
/// lowercase has another length (`İ` is 2 bytes, its lowercase 3).
fn last_ascii_ci(text: &str, word: &str) -> Option<usize> {
    let (text, word) = (text.as_bytes(), word.as_bytes());
    (0..=text.len().checked_sub(word.len())?)
        .rev()
        .find(|&i| text[i..i + word.len()].eq_ignore_ascii_case(word))
}

fn digit(word: &str) -> Option<Verdict> {
    match word {
        "1" => Some(Verdict::First),
        "2" => Some(Verdict::Neither),
        "3" => Some(Verdict::Second),
        _ => None,
    }
}

/// The follow-up after a reply without a verdict.
pub const FOLLOW_UP: &str = "Your reply did not end with a clear judgment. Reply with a single digit and nothing else: 1 if the first answer is better, 2 if neither is better nor worse, 3 if the first answer is worse.";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_authors_format() {
        let reply = "### Rationale:\n1. The first answer follows the instruction; 3 facts are wrong in the second.\n\n### Judgment:\n**3**";
        assert_eq!(parse_verdict(reply), Some(Verdict::Second));
        assert_eq!(parse_verdict("Judgment: 1."), Some(Verdict::First));
        assert_eq!(parse_verdict(" **2** "), Some(Verdict::Neither));
    }

    #[test]
    fn refuses_replies_without_a_verdict() {
        assert_eq!(parse_verdict("Both are fine, I think."), None);
        assert_eq!(parse_verdict("### Judgment:\nthe first one"), None);
        assert_eq!(parse_verdict("### Judgment: 12"), None);
        assert_eq!(parse_verdict("4"), None);
    }

    #[test]
    fn multi_byte_text_before_the_verdict_moves_no_offset() {
        // Each "İ" is 2 bytes but lowercases to 3: offsets from a lowercased copy overran
        // the reply (a panic) or landed later in it (the wrong digit).
        let prefix = "İ".repeat(20);
        assert_eq!(
            parse_verdict(&format!("{prefix} Judgment: 1")),
            Some(Verdict::First)
        );
        let prefix = "İ".repeat(12);
        let reply = format!("{prefix} Judgment: 1. (3 would be wrong)");
        assert_eq!(parse_verdict(&reply), Some(Verdict::First));
        assert_eq!(parse_verdict("JUDGMENT: 2"), Some(Verdict::Neither));
    }

    #[test]
    fn a_preference_must_survive_the_swap() {
        use Verdict::*;
        assert_eq!(combine(First, Second), Outcome::Win);
        assert_eq!(combine(Second, First), Outcome::Loss);
        // A judge that always prefers the first position prefers neither answer.
        assert_eq!(combine(First, First), Outcome::Tie);
        assert_eq!(combine(Second, Second), Outcome::Tie);
        assert_eq!(combine(Neither, Neither), Outcome::Tie);
        assert_eq!(combine(First, Neither), Outcome::Tie);
    }
}
