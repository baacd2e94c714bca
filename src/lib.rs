//! # ual — uncertainty-aware learning
//!
//! Supervised fine-tuning of LLaMA-family language models where each sample's label-smoothing
//! value comes from that sample's uncertainty (Wang et al., "Uncertainty Aware Learning for
//! Language Model Alignment", ACL 2024), on any wgpu adapter or on the CPU.
//!
//! Each module depends only on those before it here: `ops` (the hand-written kernels),
//! `gguf` (llama.cpp's file format), `device` and `cluster` (the ranks of an `mpirun` job) at the
//! bottom; then `uncertainty` (a score becomes ε), `data` (examples become
//! samples), `model`, `loss` (the UAL loss and the training objective), `train`; `llm` (the
//! client of an OpenAI-compatible endpoint); and the commands' libraries on top: `eval`,
//! `annotate`, `judge`, `study`, `bench`.
#![warn(missing_docs)]

pub mod alloc;
pub mod annotate;
pub mod bench;
pub mod cluster;
pub mod data;
pub mod device;
pub mod eval;
pub mod gguf;
pub mod judge;
pub mod llm;
pub mod loss;
pub mod model;
pub mod ops;
pub mod study;
pub mod train;
pub mod uncertainty;
pub mod util;

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Every citation of a section of `docs/ARCHITECTURE.md` in the sources, scripts and
    /// documents names one that exists, and nothing cites the design that preceded it.
    #[test]
    fn cited_architecture_sections_exist() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let doc = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).unwrap();
        let sections: Vec<String> = doc
            .lines()
            .filter_map(|l| l.strip_prefix("## "))
            .filter_map(|l| l.split_once('.').map(|(n, _)| n.to_string()))
            .collect();
        let mut files = vec![root.join("README.md"), root.join("BENCHMARKS.md")];
        for dir in ["src", "tests", "scripts", "benches"] {
            collect(&root.join(dir), &mut files);
        }
        let needle = ["ARCHITECTURE", " §"].concat();
        let mut cited = 0;
        for file in files {
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue;
            };
            let name = file.display();
            assert!(
                !text.contains(&["DESIGN", " §"].concat()),
                "{name} cites DESIGN"
            );
            for (at, _) in text.match_indices(&needle) {
                let rest = &text[at + needle.len()..];
                let number: String = rest.chars().take_while(char::is_ascii_digit).collect();
                assert!(
                    sections.contains(&number),
                    "{name}: {needle}{number} does not exist"
                );
                cited += 1;
            }
        }
        assert!(cited >= 7, "the sections are cited ({cited} citations)");
    }

    fn collect(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() && !path.ends_with("fixtures") {
                collect(&path, files);
            } else if path
                .extension()
                .is_some_and(|e| e == "rs" || e == "py" || e == "md")
            {
                files.push(path);
            }
        }
    }
}
