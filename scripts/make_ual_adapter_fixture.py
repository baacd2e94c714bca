#!/usr/bin/env python3
"""Proves PEFT loads adapters that ual trains: copies a ual-exported adapter for the llama-gqa
fixture into tests/fixtures/adapters/llama-gqa-ual/ and records PEFT's log-probs with it.

PEFT only warns on unknown keys and then runs the base model, so this checks that the adapter
moves the log-probs well beyond rounding, i.e. that PEFT really applied it.

    cargo run --release -- train --device cpu --set name=gqa-fixture \
        --set model='"tests/fixtures/models/llama-gqa"' --set steps=6 --set optim.lr=0.05 \
        --set lora.r=4 --set lora.alpha=8.0 --set eval_every=0 --set checkpoint_every=0
    python scripts/make_ual_adapter_fixture.py runs/gqa-fixture/adapter
"""
import json
import pathlib
import shutil
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
BASE = ROOT / "tests" / "fixtures" / "models" / "llama-gqa"
OUT = ROOT / "tests" / "fixtures" / "adapters" / "llama-gqa-ual"
TEXTS = ["Natalia sold clips to 48 of her friends in April.", "Write a haiku about autumn leaves falling."]


def main(adapter):
    OUT.mkdir(parents=True, exist_ok=True)
    for f in ["adapter_model.safetensors", "adapter_config.json"]:
        shutil.copy(pathlib.Path(adapter) / f, OUT / f)
    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float64, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, OUT).eval()
    tok = AutoTokenizer.from_pretrained(BASE)
    records = []
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
            with model.disable_adapter():
                base_lp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
        logprobs = [None] + [lp[j - 1, ids[j]].item() for j in range(1, len(ids))]
        shift = max(abs(lp[j - 1, ids[j]].item() - base_lp[j - 1, ids[j]].item()) for j in range(1, len(ids)))
        assert shift > 1e-2, f"PEFT did not apply the adapter (shift {shift})"
        records.append(dict(text=text, ids=ids, logprobs=logprobs))
        print(f"{text[:30]!r}: PEFT applies ual's adapter, log-probs move by up to {shift:.3f} nats")
    (OUT / "expected.json").write_text(json.dumps(dict(texts=records), indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
