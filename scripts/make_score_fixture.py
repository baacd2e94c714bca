#!/usr/bin/env python3
"""Writes the expected `ual score --data` output for a fixture model, computed with transformers
and PyTorch's own `cross_entropy(label_smoothing=eps)` over each line's response tokens.

Tokenisation follows ARCHITECTURE §4: ids = encode(prompt + response) with the tokenizer's special
tokens, then EOS; response tokens are those after len(encode(prompt)). ε follows the paper's
linear mapping (ARCHITECTURE §3, ual's defaults): ε = 0.2 · (u − 1) / 9, u = 5.5 when absent.

    pip install torch transformers
    python scripts/make_score_fixture.py
"""
import json
import pathlib

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
BASE = ROOT / "tests" / "fixtures" / "models" / "llama-gqa"
OUT = ROOT / "tests" / "fixtures" / "score"
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                "further context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
LINES = [
    {"instruction": "What is 7 times 6?", "output": "7 * 6 = 42\n#### 42", "uncertainty": 1},
    {"instruction": "Write a short poem about the sea.", "output": "Grey waves fold and unfold.", "uncertainty": 10},
    {"prompt": "The capital of France is", "completion": " Paris."},
    {"instruction": "Name a colour.", "input": "Something warm.", "output": "Orange.", "uncertainty": 6.5,
     "note": "unknown fields are ignored"},
]


def render(line):
    if "prompt" in line:
        return line["prompt"], line["completion"]
    if line.get("input"):
        return ALPACA_INPUT.format(**line), line["output"]
    return ALPACA.format(instruction=line["instruction"]), line["output"]


def main():
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float64, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(BASE)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "data.jsonl").write_text("".join(json.dumps(l) + "\n" for l in LINES))
    records = []
    for index, line in enumerate(LINES):
        prompt, response = render(line)
        start = len(tok(prompt)["input_ids"])
        ids = tok(prompt + response)["input_ids"] + [tok.eos_token_id]
        eps = 0.2 * (line.get("uncertainty", 5.5) - 1) / 9
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        rows = logits[start - 1:len(ids) - 1]
        targets = torch.tensor(ids[start:])
        nll = F.cross_entropy(rows, targets).item()
        loss = F.cross_entropy(rows, targets, label_smoothing=eps).item()
        records.append(dict(index=index, ids=ids, response_start=start, response_tokens=len(targets),
                            smoothing=eps, nll=nll, loss=loss))
        print(f"line {index}: {len(targets)} response tokens, eps {eps:.3f}, nll {nll:.4f}, loss {loss:.4f}")
    (OUT / "expected.json").write_text(json.dumps(dict(model="models/llama-gqa", lines=records), indent=1))


if __name__ == "__main__":
    main()
