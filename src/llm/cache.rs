//! The request cache, `OUT.cache.jsonl`: one line per answered request, appended and flushed as
//! each answer arrives, so a crash, Ctrl-C or kill -9 loses nothing that was answered.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// What a request got: a score, or the reply that held none.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    /// The request's key: a hash of the model and the prompt.
    pub key: String,
    /// The score read from the reply, if one was found.
    pub score: Option<f64>,
    /// The last reply, kept so a failure's reason can be shown without asking again.
    pub reply: String,
}

/// Answers already received, kept on disk so that a re-run asks only for the rest.
pub struct Cache {
    answers: Mutex<HashMap<String, Answer>>,
    file: Mutex<File>,
}

impl Cache {
    /// Loads `path` (a torn last line from a crash is skipped) and opens it for appending.
    pub fn open(path: &Path) -> Result<Self> {
        let mut answers = HashMap::new();
        if let Ok(text) = std::fs::read_to_string(path) {
            for line in text.lines() {
                if let Ok(answer) = serde_json::from_str::<Answer>(line) {
                    answers.insert(answer.key.clone(), answer);
                }
            }
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        // A torn line must not glue itself to the next record.
        if std::fs::metadata(path)
            .map(|m| m.len() > 0)
            .unwrap_or(false)
            && !std::fs::read(path)
                .map(|b| b.ends_with(b"\n"))
                .unwrap_or(true)
        {
            file.write_all(b"\n")?;
        }
        Ok(Self {
            answers: Mutex::new(answers),
            file: Mutex::new(file),
        })
    }

    /// The cached answer to the request with `key`, loaded or recorded since.
    pub fn get(&self, key: &str) -> Option<Answer> {
        self.answers.lock().expect("cache lock").get(key).cloned()
    }

    /// Answers in the cache.
    pub fn len(&self) -> usize {
        self.answers.lock().expect("cache lock").len()
    }

    /// Whether the cache holds no answer.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends one answer and flushes it to disk before returning; [`Cache::get`] sees it.
    pub fn record(&self, answer: &Answer) -> Result<()> {
        let line = serde_json::to_string(answer)? + "\n";
        let mut file = self.file.lock().expect("cache lock");
        file.write_all(line.as_bytes())?;
        file.flush()?;
        self.answers
            .lock()
            .expect("cache lock")
            .insert(answer.key.clone(), answer.clone());
        Ok(())
    }
}

/// The cache key of a request: FNV-1a of the model name and the prompt text, in hex.
pub fn key(model: &str, prompt: &str) -> String {
    let hash = |seed: u64| {
        model
            .bytes()
            .chain([0u8])
            .chain(prompt.bytes())
            .fold(seed, |h, b| {
                (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
            })
    };
    // Two differently seeded 64-bit hashes: 128 bits keep collisions out of reach.
    format!(
        "{:016x}{:016x}",
        hash(0xcbf2_9ce4_8422_2325),
        hash(0x84222325cbf29ce4)
    )
}
