#!/usr/bin/env python3
"""Fixtures for the authors' UAL recipe, from a fresh Python port of their code.

The port follows github.com/ekonwang/UAL4Alignment @ 3ed0ffc (Apache-2.0):
- `make_score_dist`, `label_smooth`, `loss_fn`: finetune/utils.py
- `generate_prompt`, `prepare_sample`, `tokenize`: scripts/prepare_llama2.py and
  scripts/prepare_mistral.py (the Vicuna turns of the 7B recipes; each turn tokenised on its
  own with BOS, ending in EOS; `mask_inputs=False`, so every token is labelled)
- micro-batch 1, so each sample's loss is `loss_fn` on that sample alone.

Outputs (tests/fixtures/paper/):
- data.jsonl: ShareGPT lines (both shapes) with 0-99 `uncertainty` scores;
- expected.json: per line, for each variant, the ids, loss mask, ε, NLL and loss the port gives
  on the fixture model tests/fixtures/models/mistral-f16 (transformers, float64):
    "paper": their recipe as configs/ual-paper-mistral-7b.toml sets it (spread over the V-1
             other tokens, loss on every token, per-sample mean with their divisor);
    "all_response": ε spread over all V (PyTorch's convention), loss on the responses only
             (their `mask_inputs=True`), max_seq_len 48 (one line is cut);
- mapping.json: `make_score_dist` on score lists, some of which hit the 0.99 cap.

    pip install torch transformers numpy
    python scripts/make_paper_recipe_fixtures.py
"""
import json
import pathlib

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "models" / "mistral-f16"
OUT = ROOT / "tests" / "fixtures" / "paper"
IGNORE_INDEX = -1

LINES = [
    {"conversations": ["What is 7 times 6?", "7 * 6 = 42. The answer is 42."], "uncertainty": 3},
    {"conversations": ["Write a two-line poem about rain.", "Soft rain on the roof,\nthe night hums along."],
     "uncertainty": 88},
    {"id": "deita-1", "conversations": [
        {"from": "human", "value": "Name a prime number."},
        {"from": "gpt", "value": "Seven."},
        {"from": "human", "value": "And an even one?"},
        {"from": "gpt", "value": "Two is the only even prime."}], "uncertainty": 25},
    {"conversations": ["Solve x + 3 = 5.", "x = 2"], "uncertainty": 0},
    {"conversations": [{"from": "human", "value": "Describe a quiet morning in a small town, with the bakery "
                        "opening and the first bus leaving."},
                       {"from": "gpt", "value": "The baker props the door open, warm bread on the air, "
                        "while the first bus sighs away from the square."}], "uncertainty": 71},
]


# --- the authors' code, ported ---------------------------------------------------------------

def make_score_dist(raw_scores, target_mean=0.1, max_values=0.99):
    assert target_mean <= max_values
    scores = np.array(raw_scores, dtype=np.float64)
    while abs(np.mean(scores) - target_mean) >= 0.001:
        scores = scores / np.mean(scores) * target_mean
        scores = np.clip(scores, scores.min(), max_values)
    return scores.tolist()


def label_smooth(labels, classes, smoothing):
    """finetune/utils.py, list branch: 1 - ε on the label, ε / (V - 1) on every other class."""
    labels_copy = labels.clone()
    labels_copy[labels_copy == -1] = 0
    smoothed = []
    for i, smooth_value in enumerate(smoothing):
        confidence = 1.0 - smooth_value
        smooth_label = torch.full((labels.size(1), classes), smooth_value / (classes - 1), dtype=torch.float64)
        smooth_label.scatter_(1, labels_copy[i].unsqueeze(-1), confidence)
        smoothed.append(smooth_label)
    return torch.stack(smoothed)


def label_smooth_all(labels, classes, smoothing):
    """The same target in PyTorch's convention: ε / V on every class, 1 - ε + ε / V on the label."""
    labels_copy = labels.clone()
    labels_copy[labels_copy == -1] = 0
    smoothed = []
    for i, eps in enumerate(smoothing):
        smooth_label = torch.full((labels.size(1), classes), eps / classes, dtype=torch.float64)
        smooth_label.scatter_(1, labels_copy[i].unsqueeze(-1), 1.0 - eps + eps / classes)
        smoothed.append(smooth_label)
    return torch.stack(smoothed)


def loss_fn(logits, targets_, smoothing, smooth=label_smooth):
    """finetune/utils.py `loss_fn`: shifted, masked where the label is -1, divided by the
    number of non-padding labels *before* the shift."""
    targets = smooth(targets_, logits.size(-1), smoothing)
    logits = logits[..., :-1, :].contiguous()
    targets = targets[..., 1:, :].contiguous()
    logits = logits.view(-1, logits.size(-1))
    targets = targets.view(-1, targets.size(-1))
    real_mask = targets_ != -1
    mask = real_mask.unsqueeze(-1).expand(-1, -1, logits.size(-1))[..., 1:, :]
    mask = mask.reshape(-1, logits.size(-1)).to(torch.float64)
    log_preds = F.log_softmax(logits, dim=1) * mask
    return -torch.sum(log_preds * targets) / real_mask.to(torch.float64).sum()


def generate_prompt(instruction):
    return f"\n\n### User: {instruction}\n\n### Assistant: "


def tokenize(tok, string, max_length, eos=True):
    # prepare_mistral.py: HF encode (with BOS), truncated, then EOS.
    ids = tok(string, max_length=max_length, truncation=True)["input_ids"]
    return ids + ([tok.eos_token_id] if eos else [])


def turns(line):
    conv = line["conversations"]
    values = [c if isinstance(c, str) else c["value"] for c in conv]
    return list(zip(values[::2], values[1::2]))


def prepare_sample(tok, line, max_length, mask_inputs):
    ids, labels = [], []
    for instr, resp in turns(line):
        prompt = generate_prompt(instr)
        enc_prompt = tokenize(tok, prompt, max_length, eos=False)
        enc_full = tokenize(tok, prompt + resp, max_length, eos=True)
        label = list(enc_full)
        if mask_inputs:
            label[:len(enc_prompt)] = [IGNORE_INDEX] * len(enc_prompt)
        ids += enc_full
        labels += label
    return ids[:max_length], labels[:max_length]


# --- fixtures -------------------------------------------------------------------------------

def variant(model, tok, smooth_values, max_length, mask_inputs, smooth):
    records = []
    for line, eps in zip(LINES, smooth_values):
        ids, labels = prepare_sample(tok, line, max_length, mask_inputs)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits.to(torch.float64)
        y = torch.tensor([labels])
        loss = loss_fn(logits, y, [eps], smooth).item()
        # The mean NLL over the positions that carry loss (labels after the shift).
        shifted = torch.tensor(labels[1:])
        keep = shifted != IGNORE_INDEX
        nll = F.cross_entropy(logits[0, :-1][keep], shifted[keep]).item()
        records.append(dict(ids=ids, loss_mask=[False] + [bool(k) for k in keep.tolist()],
                            epsilon=eps, nll=nll, loss=loss))
    return records


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "data.jsonl").write_text("".join(json.dumps(l) + "\n" for l in LINES))
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float64, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(MODEL)
    scores = [l["uncertainty"] for l in LINES]
    smooth_values = make_score_dist(scores, target_mean=0.1)
    expected = dict(
        model="models/mistral-f16",
        scores=scores,
        paper=variant(model, tok, smooth_values, 768, False, label_smooth),
        all_response=variant(model, tok, smooth_values, 48, True, label_smooth_all),
    )
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1))
    for name in ("paper", "all_response"):
        print(name, [round(r["loss"], 5) for r in expected[name]])

    rng = np.random.default_rng(15)
    cases = [
        dict(scores=scores, target_mean=0.1, cap=0.99),
        # One large score among small ones: the first rescale overshoots the cap.
        dict(scores=[0, 1, 2, 3, 99], target_mean=0.3, cap=0.99),
        dict(scores=[0, 0, 5, 10, 90, 99], target_mean=0.4, cap=0.99),
        dict(scores=[1, 1, 1, 80], target_mean=0.2, cap=0.5),
        dict(scores=rng.integers(0, 100, 64).tolist(), target_mean=0.1, cap=0.99),
        dict(scores=rng.integers(0, 100, 64).tolist(), target_mean=0.5, cap=0.99),
    ]
    for case in cases:
        case["epsilons"] = make_score_dist(case["scores"], case["target_mean"], case["cap"])
        case["capped"] = sum(1 for e in case["epsilons"] if e >= case["cap"] - 1e-12)
    (OUT / "mapping.json").write_text(json.dumps(cases, indent=1))
    print("mapping cases, capped samples:", [c["capped"] for c in cases])


if __name__ == "__main__":
    main()
