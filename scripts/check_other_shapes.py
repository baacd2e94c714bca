#!/usr/bin/env python3
"""Checks `ual score` against transformers on freshly made tiny models of each family, with
shapes and seeds unlike the committed fixtures, so nothing about a fixture's shape is assumed.

    cargo build --release
    python scripts/check_other_shapes.py [--device cpu|wgpu] [--seed N]
"""
import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from make_model_fixtures import COMMON, TEXTS, TOKENIZER, randomise  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHAPES = {
    "llama-wide-gqa": (dict(model_type="llama", hidden_size=48, intermediate_size=72, num_attention_heads=6,
                            num_key_value_heads=3, num_hidden_layers=3, tie_word_embeddings=False), torch.bfloat16),
    "llama-mha-tied": (dict(model_type="llama", hidden_size=24, intermediate_size=40, num_attention_heads=3,
                            num_key_value_heads=3, tie_word_embeddings=True, rope_theta=500000.0), torch.float32),
    "mistral-window3": (dict(model_type="mistral", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                             num_key_value_heads=2, sliding_window=3, tie_word_embeddings=False), torch.float16),
    "qwen2-4layers": (dict(model_type="qwen2", hidden_size=16, intermediate_size=20, num_attention_heads=4,
                           num_key_value_heads=1, num_hidden_layers=4, tie_word_embeddings=False), torch.float32),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    ual = ROOT / "target" / "release" / "ual"
    worst_all = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (cfg, dtype)) in enumerate(SHAPES.items()):
            cfg = dict(COMMON, **cfg)
            model_type = cfg.pop("model_type")
            config = AutoConfig.for_model(model_type, **cfg)
            torch.manual_seed(args.seed + i)
            model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
            randomise(model, args.seed + i)
            out = pathlib.Path(tmp) / name
            model.to(dtype).save_pretrained(out, safe_serialization=True)
            for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
                shutil.copy(TOKENIZER / f, out / f)
            ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64, attn_implementation="eager").eval()
            cmd = [str(ual), "score", "--json", "--device", args.device, "--model", str(out)]
            for t in TEXTS:
                cmd += ["--text", t]
            lines = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()
            worst = 0.0
            for line in lines:
                got = json.loads(line)
                ids = got["ids"]
                with torch.no_grad():
                    lp = torch.log_softmax(ref(torch.tensor([ids])).logits[0], -1)
                for j in range(1, len(ids)):
                    worst = max(worst, abs(got["logprobs"][j] - lp[j - 1, ids[j]].item()))
            worst_all = max(worst_all, worst)
            print(f"{name} ({dtype}, seed {args.seed + i}) on {args.device}: max |ual - transformers| = {worst:.2e}")
    sys.exit(0 if worst_all <= 2e-4 else 1)


if __name__ == "__main__":
    main()
