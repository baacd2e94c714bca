#!/usr/bin/env python3
"""Writes tiny random-weight LLaMA-family models and transformers' log-probs for them.

Each model lands in tests/fixtures/models/<name>/ with config.json, safetensors weights
(single or sharded), a copy of the Llama-2 tokenizer, and expected.json holding, per text,
the HF tokenizer's ids and transformers' per-token log-probabilities, computed in float64.

    pip install torch transformers safetensors
    python scripts/make_model_fixtures.py

Weights are drawn with a large scale so the log-probs spread over several nats: a near-uniform
model would make a wrong implementation look right.
"""
import json
import pathlib
import shutil

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizer"
OUT = ROOT / "tests" / "fixtures" / "models"

TEXTS = [
    "Natalia sold clips to 48 of her friends in April.",
    "The quick brown fox jumps over the lazy dog, then naps.",
    "Write a haiku about autumn leaves falling.",
]

COMMON = dict(vocab_size=32000, num_hidden_layers=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)

MODELS = {
    # Llama with grouped-query attention (4 query heads share 2 kv heads), stored in f32.
    "llama-gqa": (dict(model_type="llama", hidden_size=16, intermediate_size=40,
                       num_attention_heads=4, num_key_value_heads=2,
                       tie_word_embeddings=False), torch.float32, 1),
    # Llama with tied embeddings and Llama-3 RoPE scaling, stored in bf16. The small theta and
    # original length put rotary frequencies in all three bands of the scaling.
    "llama-tied-bf16": (dict(model_type="llama", hidden_size=16, intermediate_size=32,
                             num_attention_heads=2, num_key_value_heads=2,
                             tie_word_embeddings=True, rope_theta=100.0,
                             rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0,
                                               original_max_position_embeddings=64)),
                        torch.bfloat16, 1),
    # Mistral with a sliding window shorter than the texts, stored in f16 across two shards.
    "mistral-f16": (dict(model_type="mistral", hidden_size=8, intermediate_size=24,
                         num_attention_heads=2, num_key_value_heads=1, sliding_window=5,
                         tie_word_embeddings=False), torch.float16, 2),
    # Qwen2 with its q/k/v bias, stored in f32 with a tied head.
    "qwen2-bias": (dict(model_type="qwen2", hidden_size=8, intermediate_size=24,
                        num_attention_heads=2, num_key_value_heads=1,
                        tie_word_embeddings=True, rope_theta=1000.0), torch.float32, 1),
}


def randomise(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif "embed" in name or "lm_head" in name:
                p.copy_(1.0 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.4 * torch.randn(p.shape, generator=gen))


def main():
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    for seed, (name, (cfg, dtype, shards)) in enumerate(MODELS.items()):
        cfg = dict(COMMON, **cfg)
        model_type = cfg.pop("model_type")
        config = AutoConfig.for_model(model_type, **cfg)
        config._attn_implementation = "eager"
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
        randomise(model, seed)
        # Round to the storage dtype first, so the reference sees exactly the stored weights.
        model = model.to(dtype).to(torch.float32).eval()

        out = OUT / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        stored = model.to(dtype)
        total = sum(p.numel() * p.element_size() for p in stored.parameters())
        stored.save_pretrained(out, safe_serialization=True,
                               max_shard_size=(total // shards + 1) if shards > 1 else "10GB")
        # The reference is transformers loading the directory we just wrote, in float64 so its
        # own rounding is far below the test tolerance. (Casting the in-memory model instead
        # would also round its RoPE buffers to the storage dtype.)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64,
                                                     attn_implementation="eager").eval()
        for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
            shutil.copy(TOKENIZER / f, out / f)

        records = []
        for text in TEXTS:
            ids = tok(text, add_special_tokens=True)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0]
            lp = torch.log_softmax(logits, dim=-1)
            logprobs = [None] + [lp[j - 1, ids[j]].item() for j in range(1, len(ids))]
            records.append(dict(text=text, ids=ids, logprobs=logprobs))
        spread = [max(x for x in r["logprobs"][1:]) - min(x for x in r["logprobs"][1:]) for r in records]
        (out / "expected.json").write_text(json.dumps(dict(texts=records), indent=1))
        print(f"{name}: {total/1e6:.2f} MB, logprob spread {min(spread):.1f}..{max(spread):.1f} nats")


if __name__ == "__main__":
    main()
