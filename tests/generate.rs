//! Decoding: greedy continuations equal transformers' token for token, the KV cache gives the
//! logits of a full forward pass, and sampling is reproducible.

mod common;

use common::{FIXTURE_MODELS, devices, fixture_model};
use serde::Deserialize;
use ual::model::Pretrained;
use ual::model::generate::{Finish, GenerationConfig, cached_logits_along, generate};

/// Cached and uncached logits agree to this (absolute, f32).
const LOGIT_ATOL: f32 = 1e-4;

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
}

fn fixture(model: &str) -> Fixture {
    serde_json::from_str(
        &std::fs::read_to_string(fixture_model(model).join("generation.json")).unwrap(),
    )
    .unwrap()
}

/// `prompts` decoded together, prompt `i` drawing from stream `i`.
fn generate_batch(
    p: &Pretrained,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
) -> Vec<ual::model::generate::Generation> {
    let streams: Vec<usize> = (0..prompts.len()).collect();
    generate(
        &p.model,
        &p.tokenizer,
        &[],
        prompts,
        &streams,
        config,
        |_, _| {},
    )
    .unwrap()
}

fn greedy(tokens: usize) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: tokens,
        ..Default::default()
    }
}

#[test]
fn greedy_decoding_matches_transformers_alone_and_batched() {
    for (device_name, device) in devices() {
        for name in FIXTURE_MODELS {
            let p = Pretrained::load(&fixture_model(name), &device).unwrap();
            let cases = fixture(name).cases;
            // No EOS: transformers was asked for exactly this many tokens.
            let config = greedy(cases[0].greedy_ids.len());
            for case in &cases {
                let out = generate(
                    &p.model,
                    &p.tokenizer,
                    &[],
                    std::slice::from_ref(&case.prompt_ids),
                    &[0],
                    &config,
                    |_, _| {},
                )
                .unwrap();
                assert_eq!(out[0].ids, case.greedy_ids, "{device_name} {name}: alone");
                assert_eq!(out[0].finish, Finish::Length);
            }
            // Prompts of different lengths in one left-padded batch decode as they do alone.
            let prompts: Vec<Vec<u32>> = cases.iter().map(|c| c.prompt_ids.clone()).collect();
            assert_ne!(prompts[0].len(), prompts[1].len());
            let out = generate_batch(&p, &prompts, &config);
            for (got, case) in out.iter().zip(&cases) {
                assert_eq!(got.ids, case.greedy_ids, "{device_name} {name}: batched");
            }
        }
    }
}

#[test]
fn cached_logits_equal_a_full_forward_pass() {
    for (device_name, device) in devices() {
        for name in ["llama-gqa", "mistral-f16"] {
            let p = Pretrained::load(&fixture_model(name), &device).unwrap();
            let case = &fixture(name).cases[0];
            let cached = cached_logits_along(&p.model, &case.prompt_ids, &case.greedy_ids);
            let all: Vec<u32> = case
                .prompt_ids
                .iter()
                .chain(&case.greedy_ids)
                .copied()
                .collect();
            let ids = burn::tensor::Tensor::<2, burn::tensor::Int>::from_data(
                burn::tensor::TensorData::new(
                    all.iter().map(|&t| t as i64).collect::<Vec<_>>(),
                    [1, all.len()],
                ),
                &device,
            );
            let full = p
                .model
                .forward(ids)
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap();
            let vocab = p.config.vocab_size;
            let mut worst = 0f32;
            for (j, row) in cached.iter().enumerate() {
                let position = case.prompt_ids.len() - 1 + j;
                let reference = &full[position * vocab..(position + 1) * vocab];
                for (a, b) in row.iter().zip(reference) {
                    worst = worst.max((a - b).abs());
                }
            }
            eprintln!("{device_name} {name}: cached vs full logits differ by at most {worst:.2e}");
            assert!(worst <= LOGIT_ATOL, "{device_name} {name}: {worst}");
        }
    }
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let p = Pretrained::load(&fixture_model("llama-gqa"), &burn::tensor::Device::flex()).unwrap();
    let prompt = vec![fixture("llama-gqa").cases[0].prompt_ids.clone()];
    let sample = |seed, top_k, top_p| {
        let config = GenerationConfig {
            max_new_tokens: 10,
            temperature: 1.0,
            top_k,
            top_p,
            seed,
            ..Default::default()
        };
        generate(
            &p.model,
            &p.tokenizer,
            &[],
            &prompt,
            &[0],
            &config,
            |_, _| {},
        )
        .unwrap()[0]
            .ids
            .clone()
    };
    assert_eq!(
        sample(1, 0, 1.0),
        sample(1, 0, 1.0),
        "same seed, same tokens"
    );
    assert_ne!(
        sample(1, 0, 1.0),
        sample(2, 0, 1.0),
        "another seed, other tokens"
    );
    assert_eq!(sample(3, 50, 0.9), sample(3, 50, 0.9));
    // top-k = 1 leaves only the argmax, whatever the seed.
    assert_eq!(
        sample(4, 1, 1.0),
        fixture("llama-gqa").cases[0].greedy_ids[..10]
    );
}

/// Each prompt samples from its own stream (`seed + its index`), so eight prompts of very
/// different lengths sampled in one batch give what each gives alone, on every device.
#[test]
fn seeded_sampling_is_the_same_at_batch_1_and_8() {
    for (device_name, device) in devices() {
        let p = Pretrained::load(&fixture_model("llama-gqa"), &device).unwrap();
        let whole = &fixture("llama-gqa").cases[0].prompt_ids;
        let prompts: Vec<Vec<u32>> = (0..8)
            .map(|i| whole[..1 + i * (whole.len() - 1) / 7].to_vec())
            .collect();
        let config = GenerationConfig {
            max_new_tokens: 8,
            temperature: 0.9,
            top_k: 40,
            seed: 11,
            ..Default::default()
        };
        let alone: Vec<Vec<u32>> = (0..8)
            .map(|i| {
                let one = std::slice::from_ref(&prompts[i]);
                generate(&p.model, &p.tokenizer, &[], one, &[i], &config, |_, _| {}).unwrap()[0]
                    .ids
                    .clone()
            })
            .collect();
        let batched = generate_batch(&p, &prompts, &config);
        let batched: Vec<Vec<u32>> = batched.into_iter().map(|g| g.ids).collect();
        assert_eq!(batched, alone, "{device_name}");
        assert!(
            alone.iter().any(|ids| ids != &alone[0]),
            "the streams differ"
        );
    }
}

#[test]
fn stop_strings_and_eos_end_a_sequence() {
    let p = Pretrained::load(&fixture_model("llama-gqa"), &burn::tensor::Device::flex()).unwrap();
    let case = &fixture("llama-gqa").cases[0];
    let prompt = vec![case.prompt_ids.clone()];
    let full = generate(
        &p.model,
        &p.tokenizer,
        &[],
        &prompt,
        &[0],
        &greedy(12),
        |_, _| {},
    )
    .unwrap()
    .remove(0);
    // Stop on a piece of the greedy text: the result is cut before it.
    let piece: String = full
        .text
        .chars()
        .skip(full.text.chars().count() / 2)
        .take(3)
        .collect();
    let config = GenerationConfig {
        stop: vec![piece.clone()],
        ..greedy(12)
    };
    let mut streamed = String::new();
    let stopped = generate(
        &p.model,
        &p.tokenizer,
        &[],
        &prompt,
        &[0],
        &config,
        |_, t| streamed.push_str(t),
    )
    .unwrap()
    .remove(0);
    assert_eq!(stopped.finish, Finish::Stop);
    assert!(full.text.starts_with(&stopped.text) && !stopped.text.contains(&piece));
    assert_eq!(streamed, stopped.text, "streamed pieces add up to the text");
    // Treat the 4th greedy token as EOS: generation ends after 3 tokens.
    let eos = [case.greedy_ids[3]];
    let ended = generate(
        &p.model,
        &p.tokenizer,
        &eos,
        &prompt,
        &[0],
        &greedy(12),
        |_, _| {},
    )
    .unwrap()
    .remove(0);
    assert_eq!(ended.finish, Finish::Eos);
    assert_eq!(ended.ids, case.greedy_ids[..3]);
}

/// `generate --input` asks each line as training renders it: an Alpaca line with an input gets
/// the template's `### Input:` section, not the input merged into the instruction.
#[test]
fn file_mode_renders_lines_as_training_does() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("prompts.jsonl");
    std::fs::write(
        &input,
        r#"{"instruction": "Add the numbers.", "input": "3 and 4", "output": ""}"#.to_string()
            + "\n",
    )
    .unwrap();
    let out = common::ual()
        .args([
            "generate",
            "--model",
            "models/tiny",
            "--device",
            "cpu",
            "--max-new-tokens",
            "4",
            "--input",
        ])
        .arg(&input)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected = ual::data::template::alpaca_prompt("Add the numbers.", "3 and 4");
    assert_eq!(line["prompt"], expected.as_str());
    assert!(expected.contains("### Input:\n3 and 4"));
}

/// `generate --input` answers prompt-only lines in every schema training reads, bare strings
/// and a JSON array (AlpacaEval's `alpaca_eval.json`), batched with the same greedy text as one
/// at a time; `--format alpaca-eval` keeps each item's other fields.
#[test]
fn prompt_only_input_in_every_shape_and_batched_as_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let lines = [
        r#"{"messages": [{"role": "user", "content": "Name a colour."}]}"#,
        r#"{"instruction": "Add the numbers.", "input": "3 and 4"}"#,
        r#"{"prompt": "Once upon a time"}"#,
        r#""What is 2 + 2?""#,
        r#"{"conversations": ["Say hi."]}"#,
        r#"{"instruction": "A much longer instruction, so that the batch holds prompts of very different lengths and left padding matters.", "dataset": "helpful_base"}"#,
    ];
    let jsonl = tmp.path().join("prompts.jsonl");
    std::fs::write(&jsonl, lines.join("\n") + "\n").unwrap();
    let array = tmp.path().join("alpaca_eval.json");
    std::fs::write(&array, format!("[{}]", lines.join(",\n"))).unwrap();
    let run = |input: &std::path::Path, extra: &[&str]| -> String {
        let out = common::ual()
            .args([
                "generate",
                "--model",
                "models/tiny",
                "--device",
                "cpu",
                "--max-new-tokens",
                "6",
            ])
            .args(extra)
            .arg("--input")
            .arg(input)
            .output()
            .unwrap();
        common::ok(&out)
    };
    let generations = |text: &str| -> Vec<String> {
        text.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["generation"].to_string()
            })
            .collect()
    };
    let alone = generations(&run(&jsonl, &["--batch-size", "1"]));
    assert_eq!(alone.len(), lines.len());
    assert_eq!(generations(&run(&jsonl, &["--batch-size", "6"])), alone);
    assert_eq!(
        generations(&run(&array, &[])),
        alone,
        "a JSON array reads as the JSONL"
    );

    let eval: serde_json::Value = serde_json::from_str(&run(
        &array,
        &["--format", "alpaca-eval", "--generator", "mine"],
    ))
    .unwrap();
    let items = eval.as_array().unwrap();
    assert_eq!(items.len(), lines.len());
    assert_eq!(items[5]["dataset"], "helpful_base");
    assert_eq!(items[3]["instruction"], "What is 2 + 2?");
    assert!(items.iter().all(|i| i["generator"] == "mine"));
}
