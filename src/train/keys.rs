//! Every configuration key with its value and one line of help, for `ual train
//! --print-config`. The help is the first sentence of each field's doc comment, read from the
//! sources of the configuration structs themselves, so it cannot drift from them.

use super::TrainConfig;

/// The sources whose structs make up the configuration: (TOML section, struct, source).
const SECTIONS: [(&str, &str, &str); 4] = [
    ("", "TrainConfig", include_str!("config.rs")),
    ("optim", "OptimConfig", include_str!("config.rs")),
    ("lora", "LoraConfig", include_str!("../model/lora.rs")),
    (
        "smoothing",
        "SmoothingConfig",
        include_str!("../uncertainty/mod.rs"),
    ),
];

/// (key, value as TOML, help) for every key of `config`, sections after the top level.
pub fn keys(config: &TrainConfig) -> Vec<(String, String, String)> {
    let tree = toml::Value::try_from(config).expect("a configuration serialises");
    let mut out = Vec::new();
    for (section, name, source) in SECTIONS {
        let table = match section {
            "" => tree.as_table(),
            s => tree.get(s).and_then(toml::Value::as_table),
        };
        let Some(table) = table else { continue };
        for (field, help) in field_docs(source, name) {
            let key = match section {
                "" => field.clone(),
                s => format!("{s}.{field}"),
            };
            let value = match table.get(&field) {
                Some(toml::Value::Table(_)) => continue,
                Some(v) => v.to_string(),
                None => "(unset)".to_string(),
            };
            out.push((key, value, help));
        }
    }
    out
}

/// Each `pub` field of `pub struct name` in `source`, with the first sentence of its doc.
fn field_docs(source: &str, name: &str) -> Vec<(String, String)> {
    let start = source
        .find(&format!("pub struct {name} {{"))
        .unwrap_or_else(|| panic!("struct {name} in its source"));
    let mut docs = Vec::new();
    let mut fields = Vec::new();
    for line in source[start..].lines().skip(1) {
        let line = line.trim();
        if line == "}" {
            break;
        }
        if let Some(doc) = line.strip_prefix("///") {
            docs.push(doc.trim().to_string());
        } else if let Some(rest) = line.strip_prefix("pub ") {
            let field = rest
                .split(':')
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
            fields.push((field, first_sentence(&docs.join(" "))));
            docs.clear();
        } else if !line.starts_with("#[") {
            docs.clear();
        }
    }
    fields
}

fn first_sentence(doc: &str) -> String {
    match doc.find(". ") {
        Some(end) => doc[..=end].trim().to_string(),
        None => doc.trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_has_its_help() {
        let config = TrainConfig::default();
        let listed = keys(&config);
        let tree = toml::Value::try_from(&config).unwrap();
        let mut expected = 0;
        for (key, value) in tree.as_table().unwrap() {
            match value {
                toml::Value::Table(t) => expected += t.len(),
                _ => {
                    expected += 1;
                    assert!(listed.iter().any(|(k, _, _)| k == key), "{key} is listed");
                }
            }
        }
        assert!(
            listed.len() >= expected,
            "{} listed, {expected} keys",
            listed.len()
        );
        for (key, _, help) in &listed {
            assert!(!help.is_empty(), "{key} has help");
        }
        assert!(
            listed
                .iter()
                .any(|(k, v, _)| k == "optim.lr" && !v.is_empty())
        );
    }
}
