#!/usr/bin/env python3
"""A small random LLaMA whose projections are whole Q8_0/Q4_0 blocks (widths multiples of 32),
and transformers' log-probs for it with every projection replaced by gguf-py's
quantize -> dequantize round trip: what `ual score --base-dtype q8_0|q4_0` must reproduce.

    pip install torch transformers safetensors gguf numpy
    python scripts/make_quant_model_fixture.py

Writes tests/fixtures/models/llama-q32/ (config, f16 weights, the Llama-2 tokenizer) with
expected.json (the model as stored) and expected.q8_0.json / expected.q4_0.json (the
round-tripped projections), each per text: ids and float64 log-probs.
"""
import json
import pathlib
import shutil

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizer"
OUT = ROOT / "tests" / "fixtures" / "models" / "llama-q32"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

TEXTS = [
    "Natalia sold clips to 48 of her friends in April.",
    "The quick brown fox jumps over the lazy dog, then naps.",
    "Write a haiku about autumn leaves falling.",
]


def logprobs(model, tok):
    records = []
    for text in TEXTS:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        lp = torch.log_softmax(logits, dim=-1)
        records.append(dict(text=text, ids=ids,
                            logprobs=[None] + [lp[j - 1, ids[j]].item() for j in range(1, len(ids))]))
    return dict(texts=records)


def main():
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    config = AutoConfig.for_model(
        "llama", vocab_size=32000, num_hidden_layers=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5, hidden_size=64,
        intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True)
    config._attn_implementation = "eager"
    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif "embed" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                # Wide enough that 4-bit rounding moves the log-probs visibly.
                p.copy_(0.25 * torch.randn(p.shape, generator=gen))
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    model.to(torch.float16).save_pretrained(OUT, safe_serialization=True)
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copy(TOKENIZER / f, OUT / f)

    def load():
        return AutoModelForCausalLM.from_pretrained(OUT, dtype=torch.float64,
                                                    attn_implementation="eager").eval()

    (OUT / "expected.json").write_text(json.dumps(logprobs(load(), tok), indent=1))
    for name, qtype in [("q8_0", GGMLQuantizationType.Q8_0), ("q4_0", GGMLQuantizationType.Q4_0)]:
        model = load()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if any(f".{proj}." in pname for proj in PROJECTIONS):
                    # The checkpoint's values in f32, as ual quantizes them.
                    w = p.detach().to(torch.float32).numpy()
                    back = quants.dequantize(quants.quantize(w, qtype), qtype)
                    p.copy_(torch.from_numpy(np.ascontiguousarray(back)).to(torch.float64))
        (OUT / f"expected.{name}.json").write_text(json.dumps(logprobs(model, tok), indent=1))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
