#!/usr/bin/env python3
"""A LoRA adapter that ual trained directly on SmolLM2's Q4_1 GGUF, and PEFT's log-probs with
it applied to the same model dequantized to float32: tests/gguf.rs checks that `ual score
--adapter` on the GGUF gives PEFT's numbers, so the adapter ual writes is an ordinary PEFT one.

    scripts/fetch-test-models.sh
    python scripts/gguf_to_hf.py ~/.cache/ual/test-models/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smol/hf
    cargo build --release && python scripts/make_smollm2_adapter_fixture.py [UAL_BIN [HF_DIR]]

Writes tests/fixtures/smollm2/adapter/ (rank 2 on q_proj and v_proj: 0.5 MB) and
adapter_expected.json: per-token log-probs (float64) of score.jsonl's texts, whole.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "smollm2"
GGUF = pathlib.Path(os.environ.get("UAL_TEST_MODELS", pathlib.Path.home() / ".cache/ual/test-models")) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def train(ual: str) -> pathlib.Path:
    runs = pathlib.Path(tempfile.mkdtemp())
    subprocess.run([
        ual, "train", "--device", "cpu",
        "--set", f"model={GGUF}", "--set", f"train_data={OUT / 'score.jsonl'}",
        "--set", "template=chat_template", "--set", "steps=6", "--set", "batch_size=2",
        "--set", "lora.r=2", "--set", "lora.target_modules=[\"q_proj\",\"v_proj\"]",
        "--set", "optim.lr=5e-3", "--set", "eval_every=0",
        "--set", f"output_dir={runs}", "--set", "name=smollm2-lora",
    ], check=True)
    return runs / "smollm2-lora" / "adapter"


def main() -> None:
    ual = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "target/release/ual")
    hf = sys.argv[2] if len(sys.argv) > 2 else "/tmp/smol/hf"
    adapter = OUT / "adapter"
    shutil.rmtree(adapter, ignore_errors=True)
    shutil.copytree(train(ual), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = GGUF.name
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")

    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float64)
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    lines = json.loads((OUT / "score_expected.json").read_text())["lines"]
    cases = []
    for line in lines:
        text = line["prompt"] + line["response"]
        ids = tok(text, add_special_tokens=True).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        logprobs = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        cases.append({"text": text, "ids": ids, "logprobs": logprobs.tolist()})
    (OUT / "adapter_expected.json").write_text(json.dumps({
        "reference": "PEFT LoRA on transformers float64 (the GGUF dequantized by scripts/gguf_to_hf.py)",
        "cases": cases,
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
