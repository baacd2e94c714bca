#!/usr/bin/env python3
"""Prepares the bundled tiny model: its random initialisation and its pre-training corpus (its
UAL dataset is scripts/make_tiny_data.py's). The pre-training itself is done by ual's own full fine-tuning; the exact
commands are in models/README.md.

- target/tiny-init/: a 2-layer Llama (hidden 64, GQA 4/2 heads, tied embeddings) with the
  Llama-2 tokenizer and transformers' random initialisation, in float32. Not committed.
- data/corpus/gsm8k-text.jsonl: GSM8K train[1000:3000] as plain text (prompt "" and the whole
  Alpaca-formatted question and answer as the completion).

    pip install torch transformers
    python scripts/make_tiny_model.py
"""
import json
import pathlib
import random
import shutil

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent
INIT = ROOT / "target" / "tiny-init"
DATA = ROOT / "models" / "tiny" / "data"
CORPUS = ROOT / "data" / "corpus" / "gsm8k-text.jsonl"
GSM8K = ROOT / "data" / "gsm8k"
TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizer"

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def read(path):
    return [json.loads(l) for l in open(path) if l.strip()]


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main():
    torch.manual_seed(0)
    random.seed(0)
    train = read(GSM8K / "train.jsonl")
    # The bundled UAL dataset is scripts/make_tiny_data.py's (arithmetic drills and open-ended
    # instructions); this script makes the model and its pre-training corpus.
    write(CORPUS, [dict(prompt="", completion=ALPACA.format(instruction=r["question"]) + r["answer"])
                   for r in train[1000:3000]])

    config = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         torch_dtype="bfloat16")
    model = LlamaForCausalLM(config)
    model.save_pretrained(INIT, safe_serialization=True)
    # The export keeps the dtype recorded here: bf16 keeps models/tiny under 10 MB.
    cfg = json.loads((INIT / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"
    (INIT / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copy(TOKENIZER / f, INIT / f)
    print(f"wrote {INIT}, {CORPUS} and {DATA}")


if __name__ == "__main__":
    main()
