#!/usr/bin/env python3
"""Writes fused-linear-cross-entropy fixtures: the LM head (logits = hidden @ head) followed by
PyTorch's label-smoothed cross-entropy, with gradients with respect to the hidden states and the
head weight from torch autograd (float64).

Hidden states and head weights are the same splitmix64 hash as scripts/make_loss_fixtures.py,
so tests/loss_linear.rs rebuilds them bit for bit and the file stays small. The hidden gradient
is stored in full; the head gradient at sampled entries plus its sum of squares.

    pip install torch
    python scripts/make_linear_loss_fixtures.py
"""
import json
import pathlib

import numpy as np
import torch

from make_loss_fixtures import logits as hashed, splitmix64

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "loss" / "linear.json"


def reference(hidden, head, targets, eps, mask):
    h = torch.tensor(hidden, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(head, dtype=torch.float64, requires_grad=True)
    z = h @ w
    t = torch.tensor(targets)
    total = torch.zeros((), dtype=torch.float64)
    for e in sorted(set(eps)):
        rows = [r for r in range(len(targets)) if eps[r] == e and mask[r]]
        if not rows:
            continue
        idx = torch.tensor(rows)
        ls = float(np.float32(e))
        total = total + torch.nn.functional.cross_entropy(
            z[idx], t[idx], label_smoothing=ls, reduction="sum")
    if total.requires_grad:
        total.backward()
        return float(total.detach()), h.grad.numpy(), w.grad.numpy()
    return 0.0, np.zeros_like(hidden, dtype=np.float64), np.zeros_like(head, dtype=np.float64)


def sampled(seed, shape, count=64):
    with np.errstate(over="ignore"):
        x = splitmix64(np.arange(count, dtype=np.uint64) + np.uint64(seed * 104729))
    rows = [int(v % np.uint64(shape[0])) for v in x]
    cols = [int((v >> np.uint64(32)) % np.uint64(shape[1])) for v in x]
    return rows + [0, shape[0] - 1], cols + [0, shape[1] - 1]


def case(name, seed, rows, hidden, vocab, eps_cycle, mask=None):
    rng = np.random.default_rng(seed)
    targets = [int(x) for x in rng.integers(0, vocab, rows)]
    eps = [eps_cycle[r % len(eps_cycle)] for r in range(rows)]
    mask = mask if mask is not None else [r % 5 != 3 for r in range(rows)]
    h = hashed(seed, rows, hidden, 1.0)
    # Scaled so logits spread over a few units, as a trained head's do.
    w_scale = float(np.float32(4.0 / np.sqrt(hidden)))
    w = hashed(seed + 1000, hidden, vocab, w_scale)
    total, grad_h, grad_w = reference(h, w, targets, eps, mask)
    wr, wc = sampled(seed, grad_w.shape)
    return dict(name=name, seed=seed, rows=rows, hidden=hidden, vocab=vocab, head_scale=w_scale,
                targets=targets, smoothing=eps, mask=mask, loss_sum=total, count=int(sum(mask)),
                grad_hidden=[float(v) for v in grad_h.reshape(-1)],
                grad_head=dict(rows=wr, columns=wc, values=[float(grad_w[r, c]) for r, c in zip(wr, wc)],
                               sum_squares=float((grad_w ** 2).sum())))


def main():
    eps4 = [0.0, 0.05, 0.3, 0.9]
    cases = [
        case("small", 40, 7, 16, 97, eps4),
        case("v32000", 41, 9, 64, 32000, eps4),
        case("v128256", 42, 3, 32, 128256, [0.1, 0.0, 0.5], mask=[True, False, True]),
        case("all-masked", 43, 4, 16, 97, eps4, mask=[False] * 4),
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(dict(cases=cases)))
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e3:.0f} kB, {len(cases)} cases)")


if __name__ == "__main__":
    main()
