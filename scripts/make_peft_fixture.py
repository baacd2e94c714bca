#!/usr/bin/env python3
"""Writes a PEFT LoRA adapter with known non-zero weights for a fixture model, and PEFT's
log-probs with it applied, so tests can check that ual loads PEFT's own adapters.

    pip install torch transformers peft
    python scripts/make_peft_fixture.py
"""
import json
import pathlib

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
BASE = ROOT / "tests" / "fixtures" / "models" / "llama-gqa"
OUT = ROOT / "tests" / "fixtures" / "adapters" / "llama-gqa-peft"
TEXTS = ["Natalia sold clips to 48 of her friends in April.", "Write a haiku about autumn leaves falling."]


def main():
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float64, attn_implementation="eager")
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
                        init_lora_weights=False)  # random A and B, so the adapter changes the output
    peft_model = get_peft_model(model, config).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(3.0)  # a strong update: log-probs move by nats, not by rounding noise
    peft_model.save_pretrained(OUT)
    cfg_path = OUT / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "tests/fixtures/models/llama-gqa"  # not this machine's path
    cfg_path.write_text(json.dumps(cfg, indent=2))
    tok = AutoTokenizer.from_pretrained(BASE)
    records = []
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(peft_model(torch.tensor([ids])).logits[0], -1)
            base_lp = None
        with peft_model.disable_adapter(), torch.no_grad():
            base_lp = torch.log_softmax(peft_model(torch.tensor([ids])).logits[0], -1)
        logprobs = [None] + [lp[j - 1, ids[j]].item() for j in range(1, len(ids))]
        shift = max(abs(lp[j - 1, ids[j]].item() - base_lp[j - 1, ids[j]].item()) for j in range(1, len(ids)))
        records.append(dict(text=text, ids=ids, logprobs=logprobs))
        print(f"{text[:30]!r}: adapter moves log-probs by up to {shift:.2f} nats")
    (OUT / "expected.json").write_text(json.dumps(dict(texts=records), indent=1))
    print(f"wrote {OUT}: {sorted(p.name for p in OUT.iterdir())}")


if __name__ == "__main__":
    main()
