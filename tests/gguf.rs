//! GGUF in and out, against references nobody here wrote: gguf-py's block decoders, llama.cpp's
//! tokenizer and forward pass (through llama-cpp-python), transformers in float64 and PEFT, all
//! on a real pretrained model (SmolLM2-135M-Instruct's Q4_1 GGUF, fetched by
//! scripts/fetch-test-models.sh). Fixtures: scripts/make_gguf_block_fixtures.py,
//! make_smollm2_fixtures.py, make_smollm2_adapter_fixture.py, make_gguf_out_fixtures.py.

mod common;

use std::path::{Path, PathBuf};

use serde_json::Value;
use ual::gguf::{GgmlType, GgufFile};
use ual::model::Pretrained;
use ual::model::generate::GenerationConfig;

fn smollm2_fixture(name: &str) -> PathBuf {
    common::fixtures().join("smollm2").join(name)
}

fn json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

/// `ual score --json --text TEXT` with `extra` arguments: the ids and each token's log-prob.
fn score_text(text: &str, extra: &[&str]) -> (Vec<u32>, Vec<f64>) {
    score_texts(&[text], extra).remove(0)
}

/// [`score_text`] of several texts in one process (one model load).
fn score_texts(texts: &[&str], extra: &[&str]) -> Vec<(Vec<u32>, Vec<f64>)> {
    let mut args = vec!["score", "--json"];
    for text in texts {
        args.extend(["--text", text]);
    }
    args.extend_from_slice(extra);
    common::ual_ok(&args)
        .lines()
        .map(|line| {
            let out: Value = serde_json::from_str(line).expect("JSON");
            let logprobs = out["logprobs"].as_array().expect("logprobs")[1..]
                .iter()
                .map(|v| v.as_f64().expect("a log-prob"))
                .collect();
            (ids(&out["ids"]), logprobs)
        })
        .collect()
}

/// `ual COMMAND --format gguf` (merge or export) of `model` with `adapter`, if any, into `out`
/// on the CPU: its stderr.
fn write_gguf(
    command: &str,
    model: &Path,
    adapter: Option<&Path>,
    out: &Path,
    extra: &[&str],
) -> String {
    let (model, out) = (model.to_str().unwrap(), out.to_str().unwrap());
    let mut args = vec![
        command, "--device", "cpu", "--format", "gguf", "--model", model, "--output", out,
    ];
    if let Some(adapter) = adapter {
        args.extend(["--adapter", adapter.to_str().unwrap()]);
    }
    args.extend_from_slice(extra);
    common::ual_run(&args).1
}

fn max_gap(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn mean_gap(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>() / a.len() as f64
}

#[test]
fn every_block_type_decodes_as_gguf_py_does() {
    // Bit for bit: each decoder computes in f32 in gguf-py's (and llama.cpp's) order.
    let dir = common::fixtures().join("gguf/blocks");
    let meta = json(&dir.join("meta.json"));
    let n = (meta["rows"].as_u64().unwrap() * meta["cols"].as_u64().unwrap()) as usize;
    let types = meta["types"].as_object().unwrap();
    assert_eq!(types.len(), 11, "every type the issue names");
    for (name, t) in types {
        let ggml = GgmlType::from_id(t["ggml_type"].as_u64().unwrap() as u32).unwrap();
        assert_eq!(ggml.name(), name);
        assert_eq!(ggml.block_size() as u64, t["block_size"].as_u64().unwrap());
        assert_eq!(ggml.type_size() as u64, t["type_size"].as_u64().unwrap());
        let raw = std::fs::read(dir.join(format!("{name}.bin"))).unwrap();
        let expected = std::fs::read(dir.join(format!("{name}.f32"))).unwrap();
        let ours = ggml.dequantize(&raw, n);
        let mismatches = ours
            .iter()
            .zip(expected.chunks_exact(4))
            .filter(|(v, b)| v.to_bits() != u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .count();
        assert_eq!(mismatches, 0, "{name}: values differ from gguf-py's");
    }
}

#[test]
fn unsupported_and_damaged_files_are_one_line_errors() {
    let dir = tempdir("gguf-errors");
    let not_gguf = dir.join("notes.gguf");
    std::fs::write(&not_gguf, "hello").unwrap();
    let err = common::ual_err(&[
        "score",
        "--device",
        "cpu",
        "--text",
        "x",
        "--model",
        not_gguf.to_str().unwrap(),
    ]);
    assert!(
        err.contains("not a readable GGUF file") && err.contains("notes.gguf"),
        "{err}"
    );

    // A tensor of a type ual does not decode (Q2_K), named with its type.
    let mut bytes = Vec::new();
    bytes.extend(0x4655_4747u32.to_le_bytes());
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(1u64.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    let name = "blk.0.attn_q.weight";
    bytes.extend((name.len() as u64).to_le_bytes());
    bytes.extend(name.as_bytes());
    bytes.extend(2u32.to_le_bytes());
    bytes.extend(256u64.to_le_bytes());
    bytes.extend(1u64.to_le_bytes());
    bytes.extend(10u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    let q2k = dir.join("q2k.gguf");
    std::fs::write(&q2k, &bytes).unwrap();
    let err = GgufFile::open(&q2k).err().expect("refused");
    let text = format!("{err:#}");
    assert!(
        text.contains("blk.0.attn_q.weight") && text.contains("Q2_K"),
        "{text}"
    );

    // A truncated file names the tensor that runs past its end.
    let real = std::fs::read(common::smollm2()).unwrap();
    let cut = dir.join("cut.gguf");
    std::fs::write(&cut, &real[..real.len() / 2]).unwrap();
    let err = common::ual_err(&[
        "score",
        "--device",
        "cpu",
        "--text",
        "x",
        "--model",
        cut.to_str().unwrap(),
    ]);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert!(
        errors.len() == 1 && errors[0].contains("truncated"),
        "{err}"
    );
}

#[test]
fn tokenizer_equals_llama_cpp_on_300_lines() {
    let file = GgufFile::open(&common::smollm2()).unwrap();
    let tokenizer = ual::model::Tokenizer::from_gguf(&file, 49_152).unwrap();
    let text = std::fs::read_to_string(smollm2_fixture("tokenizer.jsonl")).unwrap();
    let mut lines = 0;
    for line in text.lines() {
        let case: Value = serde_json::from_str(line).unwrap();
        let text = case["text"].as_str().unwrap();
        let ours = tokenizer.encode(text).unwrap();
        assert_eq!(ours, ids(&case["llama_cpp"]), "{text:?}");
        // Decoding gives the text back (special tokens left out of both).
        lines += 1;
    }
    assert!(lines >= 300, "{lines} lines");
}

#[test]
fn score_equals_transformers_in_float64() {
    // Within 1e-4 of float64 per token (float32 transformers is 3.1e-5 from it).
    let model = common::smollm2();
    let model = model.to_str().unwrap();
    let expected = json(&smollm2_fixture("score_expected.json"));
    let lines = expected["lines"].as_array().unwrap();
    let texts: Vec<String> = lines
        .iter()
        .map(|l| {
            format!(
                "{}{}",
                l["prompt"].as_str().unwrap(),
                l["response"].as_str().unwrap()
            )
        })
        .collect();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    // lavapipe compiles kernels for every new length (~10 s each): two texts there.
    for (device, count) in [("cpu", texts.len()), (common::wgpu_spec(), 2)] {
        let scored = score_texts(&texts[..count], &["--model", model, "--device", device]);
        for (line, (got_ids, logprobs)) in lines.iter().zip(scored) {
            assert_eq!(got_ids, ids(&line["ids"]), "{device}");
            let reference = floats(&line["token_logprobs"]);
            let ours = &logprobs[logprobs.len() - reference.len()..];
            let gap = max_gap(ours, &reference);
            assert!(gap < 1e-4, "{device}, line {}: {gap:e}", line["index"]);
        }
    }
    // The fused head's NLL and UAL loss per line (the CPU; lavapipe's head is tested in loss.rs).
    let device = "cpu";
    let data = smollm2_fixture("score.jsonl");
    let out = common::ual_ok(&[
        "score",
        "--json",
        "--model",
        model,
        "--device",
        device,
        "--template",
        "chat_template",
        "--data",
        data.to_str().unwrap(),
    ]);
    for (got, line) in out.lines().zip(lines) {
        let got: Value = serde_json::from_str(got).unwrap();
        for key in ["nll", "loss"] {
            let gap = (got[key].as_f64().unwrap() - line[key].as_f64().unwrap()).abs();
            assert!(gap < 1e-4, "{device} {key}: {gap:e}");
        }
        assert_eq!(got["response_tokens"], line["response_tokens"]);
    }
}

#[test]
fn greedy_chat_replies_equal_transformers() {
    let fixture = json(&smollm2_fixture("greedy.json"));
    let template = ual::data::template::ChatTemplate::load(&common::smollm2()).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    // lavapipe compiles kernels for every new length: one reply there.
    for ((name, device), count) in common::devices().into_iter().zip([cases.len(), 1]) {
        let pretrained = Pretrained::load(&common::smollm2(), &device).unwrap();
        for case in &cases[..count] {
            let messages: Vec<ual::data::formats::Message> = case["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    ual::data::formats::Message::new(
                        m["role"].as_str().unwrap(),
                        m["content"].as_str().unwrap(),
                    )
                })
                .collect();
            let prompt = template.render(&messages, true).unwrap();
            assert_eq!(prompt, case["prompt"].as_str().unwrap());
            let prompt_ids = pretrained.tokenizer.encode(&prompt).unwrap();
            assert_eq!(prompt_ids, ids(&case["prompt_ids"]), "{name}");
            let config = GenerationConfig {
                max_new_tokens: fixture["max_new_tokens"].as_u64().unwrap() as usize,
                ..GenerationConfig::default()
            };
            let out = pretrained
                .continue_batch(&[prompt_ids], 0, &config)
                .unwrap()
                .remove(0);
            assert_eq!(
                out.ids,
                ids(&case["greedy_ids"]),
                "{name}: {:?}",
                case["text"]
            );
        }
    }
}

#[test]
fn lora_trains_on_the_gguf_and_its_adapter_is_peft_s() {
    let model = common::smollm2();
    let runs = tempdir("gguf-lora");
    let data = smollm2_fixture("score.jsonl");
    common::ual_ok(&[
        "train",
        "--device",
        "cpu",
        "--set",
        &format!("model={}", model.display()),
        "--set",
        &format!("train_data={}", data.display()),
        "--set",
        "template=chat_template",
        "--set",
        "steps=3",
        "--set",
        "batch_size=2",
        "--set",
        "lora.r=2",
        "--set",
        "lora.target_modules=[\"q_proj\",\"v_proj\"]",
        "--set",
        "eval_every=0",
        "--set",
        &format!("output_dir={}", runs.display()),
        "--set",
        "name=lora",
    ]);
    let adapter = runs.join("lora/adapter");
    assert!(adapter.join("adapter_model.safetensors").exists());
    let config = json(&adapter.join("adapter_config.json"));
    assert_eq!(config["peft_type"], "LORA");

    // The committed adapter (the same command, 6 steps) in PEFT on the dequantized model.
    let expected = json(&smollm2_fixture("adapter_expected.json"));
    let fixture_adapter = smollm2_fixture("adapter");
    let cases = expected["cases"].as_array().unwrap();
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    for (device, count) in [("cpu", texts.len()), (common::wgpu_spec(), 1)] {
        let model = model.to_str().unwrap();
        let args = [
            "--model",
            model,
            "--adapter",
            fixture_adapter.to_str().unwrap(),
            "--device",
            device,
        ];
        for (case, (got_ids, logprobs)) in cases.iter().zip(score_texts(&texts[..count], &args)) {
            assert_eq!(got_ids, ids(&case["ids"]));
            let gap = max_gap(&logprobs, &floats(&case["logprobs"]));
            assert!(gap < 1e-4, "{device}: {gap:e} from PEFT");
        }
    }
}

/// ual's reading of a GGUF file, in the shape scripts/make_gguf_out_fixtures.py records
/// gguf-py's.
fn view(path: &Path) -> Value {
    let file = GgufFile::open(path).unwrap();
    let mut metadata = serde_json::Map::new();
    for (key, value) in file.metadata() {
        let (kind, item) = file.value_type(key).unwrap();
        let mut entry = serde_json::json!({ "type": kind });
        match value {
            ual::gguf::Value::Array(items) => {
                entry["items"] = item.unwrap().into();
                entry["len"] = items.len().into();
            }
            ual::gguf::Value::Str(s) => entry["value"] = s.clone().into(),
            ual::gguf::Value::Bool(b) => entry["value"] = (*b).into(),
            ual::gguf::Value::U64(v) => entry["value"] = (*v).into(),
            ual::gguf::Value::I64(v) => entry["value"] = (*v).into(),
            ual::gguf::Value::F64(v) => entry["value"] = (*v).into(),
        }
        metadata.insert(key.clone(), entry);
    }
    let tensors: Vec<Value> = file
        .tensors()
        .iter()
        .map(|t| serde_json::json!({"name": t.name, "type": t.ggml_type.name().to_uppercase(), "dims": t.dims}))
        .collect();
    serde_json::json!({ "metadata": metadata, "tensors": tensors })
}

fn assert_llama_cpp_agrees(what: &str, ours: &[f64], theirs: &[f64]) {
    // llama.cpp computes f16 weights with f16 activations; measured: mean 1-9e-3, max 5-8e-2.
    let (mean, max) = (mean_gap(ours, theirs), max_gap(ours, theirs));
    assert!(
        mean < 0.02 && max < 0.15,
        "{what}: mean {mean:e}, max {max:e} from llama.cpp"
    );
}

#[test]
fn merged_gguf_is_what_llama_cpp_and_gguf_py_read() {
    let model = common::smollm2();
    let dir = tempdir("gguf-merge");
    let merged = dir.join("merged.gguf");
    let adapter = smollm2_fixture("adapter");
    write_gguf(
        "merge",
        &model,
        Some(&adapter),
        &merged,
        &["--dtype", "f16"],
    );
    let reference = json(&smollm2_fixture("gguf_py_view.json"));
    assert_eq!(
        view(&merged),
        reference["merged_f16"],
        "the file as gguf-py reads it"
    );
    // Written once, never over an existing file without --force.
    let again = common::ual_err(&[
        "merge",
        "--device",
        "cpu",
        "--format",
        "gguf",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--output",
        merged.to_str().unwrap(),
    ]);
    assert!(again.contains("--force"), "{again}");

    let llama_cpp = json(&smollm2_fixture("llama_cpp.json"));
    for case in llama_cpp["merged_f16"].as_array().unwrap() {
        let (got, logprobs) = score_text(
            case["text"].as_str().unwrap(),
            &["--model", merged.to_str().unwrap(), "--device", "cpu"],
        );
        assert_eq!(
            got,
            ids(&case["ids"]),
            "the merged file's tokenizer is llama.cpp's"
        );
        assert_llama_cpp_agrees("merged f16", &logprobs, &floats(&case["logprobs"]));
    }

    // q8_0: read back into a q8_0 base, the blocks are used as stored (no requantizing), so the
    // packed and the dequantized f32 readings of the file agree to float rounding.
    let q8 = dir.join("merged-q8_0.gguf");
    write_gguf("merge", &model, Some(&adapter), &q8, &["--dtype", "q8_0"]);
    let text = llama_cpp["merged_f16"][0]["text"].as_str().unwrap();
    let dense = score_text(text, &["--model", q8.to_str().unwrap(), "--device", "cpu"]).1;
    let packed = score_text(
        text,
        &[
            "--model",
            q8.to_str().unwrap(),
            "--device",
            "cpu",
            "--base-dtype",
            "q8_0",
        ],
    )
    .1;
    assert!(
        max_gap(&dense, &packed) < 1e-4,
        "{:e}",
        max_gap(&dense, &packed)
    );
    let f16 = score_text(
        text,
        &["--model", merged.to_str().unwrap(), "--device", "cpu"],
    )
    .1;
    assert!(mean_gap(&dense, &f16) < 0.05, "q8_0 stays close to f16");
}

#[test]
fn exported_adapter_is_what_llama_cpp_applies() {
    let model = common::smollm2();
    let dir = tempdir("gguf-export");
    let out = dir.join("adapter.gguf");
    let adapter = smollm2_fixture("adapter");
    write_gguf("export", &model, Some(&adapter), &out, &[]);
    let reference = json(&smollm2_fixture("gguf_py_view.json"));
    assert_eq!(view(&out), reference["adapter"]);
    let llama_cpp = json(&smollm2_fixture("llama_cpp.json"));
    for case in llama_cpp["base_f16_with_lora"].as_array().unwrap() {
        let (got, logprobs) = score_text(
            case["text"].as_str().unwrap(),
            &[
                "--model",
                model.to_str().unwrap(),
                "--adapter",
                adapter.to_str().unwrap(),
                "--device",
                "cpu",
            ],
        );
        assert_eq!(got, ids(&case["ids"]));
        assert_llama_cpp_agrees(
            "LoRA GGUF in llama.cpp",
            &logprobs,
            &floats(&case["logprobs"]),
        );
    }
}

#[test]
fn a_safetensors_model_written_as_gguf_is_what_llama_cpp_reads() {
    // Llama 2's SentencePiece tokenizer converted from tokenizer.json, merges as scores.
    let dir = tempdir("gguf-from-hf");
    let out = dir.join("llama-gqa.gguf");
    let model = common::fixture_model("llama-gqa");
    let adapter = common::fixtures().join("adapters/llama-gqa-peft");
    write_gguf("merge", &model, Some(&adapter), &out, &[]);
    let llama_cpp = json(&smollm2_fixture("llama_cpp_llama_gqa.json"));
    for case in llama_cpp["merged_f16"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let (got, logprobs) =
            score_text(text, &["--model", out.to_str().unwrap(), "--device", "cpu"]);
        assert_eq!(got, ids(&case["ids"]), "{text:?}: llama.cpp's ids");
        assert_llama_cpp_agrees("llama-gqa f16", &logprobs, &floats(&case["logprobs"]));
        let (hf_ids, _) = score_text(
            text,
            &["--model", model.to_str().unwrap(), "--device", "cpu"],
        );
        assert_eq!(hf_ids, got, "the GGUF tokenizer equals the directory's");
    }
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ual-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn every_fixture_architecture_survives_gguf() {
    // ual writes each fixture model (no adapter: a conversion) and reads it back: Mistral's f16
    // weights stay exact and Qwen2's f32 ones (with q/k/v biases, never permuted) round to f16.
    // GGUF has no sliding window (llama.cpp's converter drops Mistral's too): said when
    // written, and the same within the fixture's 5-token window.
    let dir = tempdir("gguf-architectures");
    let long = "Below is an instruction that describes a task. 12 345 café";
    for (name, text, tolerance) in [
        ("mistral-f16", "Hi there", 1e-4),
        ("qwen2-bias", long, 2e-2),
    ] {
        let model = common::fixture_model(name);
        let out = dir.join(format!("{name}.gguf"));
        let said = write_gguf("merge", &model, None, &out, &[]);
        assert_eq!(
            said.contains("sliding window"),
            name == "mistral-f16",
            "{said}"
        );
        let (hf_ids, hf) = score_text(
            text,
            &["--model", model.to_str().unwrap(), "--device", "cpu"],
        );
        let (ids, ours) = score_text(text, &["--model", out.to_str().unwrap(), "--device", "cpu"]);
        assert_eq!(ids, hf_ids, "{name}: the converted tokenizer");
        let gap = max_gap(&ours, &hf);
        assert!(gap < tolerance, "{name}: {gap:e}");
    }
    // Llama 3's RoPE scaling is not written (llama.cpp keeps it as a `rope_freqs` tensor).
    let model = common::fixture_model("llama-tied-bf16");
    let out = dir.join("llama3.gguf");
    let err = common::ual_err(&[
        "merge",
        "--device",
        "cpu",
        "--format",
        "gguf",
        "--model",
        model.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("rope_scaling") && !out.exists(), "{err}");
    let err = common::ual_err(&["merge", "--model", "models/tiny", "--output", "x"]);
    assert!(err.contains("--adapter"), "{err}");
}
