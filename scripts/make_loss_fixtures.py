#!/usr/bin/env python3
"""Writes UAL-loss fixtures whose reference is PyTorch's own label-smoothed cross-entropy.

For each case, rows are grouped by their smoothing value and each group goes through
torch.nn.functional.cross_entropy(..., label_smoothing=eps, reduction="none") in float64; masked
rows are dropped. The gradient of the summed loss comes from torch autograd.

Logits are not stored: they are a hash of (seed, index) that tests/loss.rs recomputes bit for
bit in f32, so even V = 151,936 costs a few kB. Gradients are stored in full for small V and,
for large V, at sampled columns (target, first, last and hashed ones) plus each row's sum of
squares.

    pip install torch
    python scripts/make_loss_fixtures.py
"""
import json
import pathlib

import numpy as np
import torch

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "loss" / "cases.json"
MASK64 = (1 << 64) - 1


def splitmix64(x):
    """Vectorised splitmix64 over uint64 numpy arrays (wrapping arithmetic)."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(MASK64)
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & np.uint64(MASK64)
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & np.uint64(MASK64)
    return x ^ (x >> np.uint64(31))


def logits(seed, rows, vocab, scale):
    """z = (2u - 1) * scale with u a 24-bit uniform; every step is exact or one f32 rounding."""
    with np.errstate(over="ignore"):
        idx = np.arange(rows * vocab, dtype=np.uint64) + np.uint64(seed) * np.uint64(1 << 40)
        u = (splitmix64(idx) >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)
    z = (u * np.float32(2.0) - np.float32(1.0)) * np.float32(scale)
    return z.reshape(rows, vocab)


def reference(z, targets, eps, mask):
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(targets)
    losses = torch.zeros(len(targets), dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    for e in sorted(set(eps)):
        rows = [r for r in range(len(targets)) if eps[r] == e and mask[r]]
        if not rows:
            continue
        idx = torch.tensor(rows)
        # The f32 value of eps, as the kernel sees it.
        ls = float(np.float32(e))
        group = torch.nn.functional.cross_entropy(zt[idx], t[idx], label_smoothing=ls, reduction="none")
        losses = losses.index_put((idx,), group.detach())
        total = total + group.sum()
    if total.requires_grad:
        total.backward()
        grad = zt.grad.numpy()
    else:
        grad = np.zeros_like(z, dtype=np.float64)
    return losses.numpy(), float(total.detach()), grad


def sample_columns(seed, vocab, target):
    with np.errstate(over="ignore"):
        h = splitmix64(np.arange(13, dtype=np.uint64) + np.uint64(seed * 7919 + target))
    cols = {0, vocab - 1, target, *[int(x % np.uint64(vocab)) for x in h]}
    return sorted(cols)


def case(name, seed, rows, vocab, scale, eps_cycle, mask=None):
    rng = np.random.default_rng(seed)
    targets = [int(x) for x in rng.integers(0, vocab, rows)]
    eps = [eps_cycle[r % len(eps_cycle)] for r in range(rows)]
    mask = mask if mask is not None else [r % 5 != 3 for r in range(rows)]
    z = logits(seed, rows, vocab, scale)
    losses, total, grad = reference(z, targets, eps, mask)
    full = vocab <= 1000
    grads = []
    for r in range(rows):
        cols = list(range(vocab)) if full else sample_columns(seed, vocab, targets[r])
        grads.append(dict(columns=cols, values=[float(grad[r, c]) for c in cols],
                          sum_squares=float((grad[r] ** 2).sum())))
    return dict(name=name, seed=seed, rows=rows, vocab=vocab, scale=scale, targets=targets,
                smoothing=eps, mask=mask, row_losses=[float(x) for x in losses], loss_sum=total,
                count=int(sum(mask)), grads=grads)


def main():
    eps4 = [0.0, 0.05, 0.3, 0.9]
    cases = [case(f"v{v}", 10 + i, 6, v, 8.0, eps4)
             for i, v in enumerate([2, 7, 97, 1000, 32000, 32001, 128256, 151936])]
    cases += [
        case("one-row", 30, 1, 32000, 8.0, [0.3], mask=[True]),
        case("all-masked", 31, 4, 97, 8.0, eps4, mask=[False] * 4),
        case("large-magnitude", 32, 5, 32000, 80.0, eps4, mask=[True] * 5),
        case("sft-eps0", 33, 5, 1000, 8.0, [0.0]),
        case("largest-vocab", 34, 2, 262144, 8.0, [0.1], mask=[True, True]),
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(dict(cases=cases)))
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e3:.0f} kB, {len(cases)} cases)")


if __name__ == "__main__":
    main()
