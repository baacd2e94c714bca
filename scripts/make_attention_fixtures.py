"""Reference causal self-attention and its gradients for tests/attention.rs.

PyTorch's scaled_dot_product_attention in float64: causal (is_causal=True), and with a sliding
window as an explicit mask, with grouped-query heads where kv_heads is given (enable_gqa) (Mistral's rule: position i sees j when 0 <= i - j < window). The
inputs are the splitmix64 hash of scripts/make_loss_fixtures.py, so the test rebuilds them bit
for bit; the file holds only the outputs and the gradients of sum(grad * output).

    pip install torch numpy
    python scripts/make_attention_fixtures.py
"""
import json
import pathlib

import torch
import torch.nn.functional as F

from make_loss_fixtures import logits as hashed

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "attention.json"


def tensor(seed, shape, scale):
    b, h, s, d = shape
    values = hashed(seed, b * h * s, d, scale)
    return torch.tensor(values, dtype=torch.float64).reshape(shape)


def case(name, seed, shape, window=None, kv_heads=None):
    b, h, s, d = shape
    kv_shape = (b, kv_heads or h, s, d)
    q = tensor(seed, shape, 2.0).requires_grad_()
    k, v = (tensor(seed + i, kv_shape, 2.0).requires_grad_() for i in (1, 2))
    grad = tensor(seed + 3, shape, 1.0)
    gqa = {"enable_gqa": True} if kv_heads else {}
    if window is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
    else:
        i = torch.arange(s).unsqueeze(1)
        j = torch.arange(s).unsqueeze(0)
        visible = (j <= i) & (i - j < window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, **gqa)
    (out * grad).sum().backward()
    flat = lambda t: [float(f"{x:.9g}") for x in t.detach().reshape(-1).tolist()]
    return {
        "name": name,
        "seed": seed,
        "shape": list(shape),
        "window": window,
        "kv_heads": kv_heads,
        "output": flat(out),
        "grad_q": flat(q.grad),
        "grad_k": flat(k.grad),
        "grad_v": flat(v.grad),
    }


def main():
    cases = [
        # 70 rows: a full block of 64 query rows and a partial one.
        case("causal", 50, (1, 2, 70, 4)),
        # A window shorter than a block, so blocks start past key 0.
        case("window", 60, (1, 1, 70, 8), window=20),
        # Shorter than one block, two sequences.
        case("short", 70, (2, 1, 5, 4)),
        # Grouped-query attention (two query heads per key/value head) with a window, over
        # three blocks of 64 queries and several tiles of keys.
        case("grouped", 80, (1, 4, 130, 8), window=50, kv_heads=2),
        # A head as wide as Llama's: 8-key tiles, and one key/value head for all query heads.
        case("wide", 90, (1, 2, 20, 128), kv_heads=1),
    ]
    OUT.write_text(json.dumps({"torch": torch.__version__, "cases": cases}) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
