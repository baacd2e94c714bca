#!/usr/bin/env python3
"""Checks that a directory written by `ual merge` loads in transformers and gives the log-probs
PEFT gives for the base model with the adapter applied.

    ual merge --model tests/fixtures/models/llama-gqa --adapter tests/fixtures/adapters/llama-gqa-peft --output /tmp/merged
    python scripts/check_merge.py /tmp/merged tests/fixtures/adapters/llama-gqa-peft/expected.json
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM


def main(merged, expected_path):
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float64, attn_implementation="eager").eval()
    worst = 0.0
    for case in json.load(open(expected_path))["texts"]:
        ids = case["ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
        for j in range(1, len(ids)):
            worst = max(worst, abs(lp[j - 1, ids[j]].item() - case["logprobs"][j]))
    print(f"{merged}: transformers loads it; max |log-prob - PEFT| = {worst:.2e}")
    sys.exit(0 if worst < 2e-4 else 1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
