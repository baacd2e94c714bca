#!/usr/bin/env python3
"""Writes transformers' greedy continuations for each fixture model, so tests can check that
ual's KV-cache decoding picks the same tokens.

Each prompt is decoded on its own (no padding) in float64 with eager attention. The smallest
gap between the best and second-best logit over all steps is recorded: a gap far above f32
noise means the continuation is a fair test, not a coin toss.

    pip install torch transformers
    python scripts/make_generation_fixtures.py
"""
import json
import pathlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = ROOT / "tests" / "fixtures" / "models"
PROMPTS = ["Natalia sold clips to 48 of her friends in April.", "Write a haiku about"]
NEW_TOKENS = 12


def main():
    for name in ["llama-gqa", "llama-tied-bf16", "mistral-f16", "qwen2-bias"]:
        path = MODELS / name
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="eager").eval()
        tok = AutoTokenizer.from_pretrained(path)
        cases = []
        for prompt in PROMPTS:
            ids = tok(prompt)["input_ids"]
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                     do_sample=False, output_scores=True, return_dict_in_generate=True,
                                     pad_token_id=0)
            new = out.sequences[0, len(ids):].tolist()
            gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
            cases.append(dict(prompt=prompt, prompt_ids=ids, greedy_ids=new, min_gap=min(gaps)))
            print(f"{name}: {prompt[:20]!r} -> {new} (min top-2 gap {min(gaps):.4f})")
        (path / "generation.json").write_text(json.dumps(dict(cases=cases), indent=1))


if __name__ == "__main__":
    main()
