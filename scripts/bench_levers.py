#!/usr/bin/env python3
"""Measures ual's memory levers one at a time against the default, in one sitting:
`ual bench step` with the fused head (default), without its vocabulary split
(`--head-vocab-splits 1`, the same as the default on CPUs), with `--unfused-head`, with
`--gradient-checkpointing ops` and `layers`, and with `--base-dtype f16`. Prints a Markdown table.
`--variants` picks some (by key); `--repeats N` runs the list N times, alternating, and keeps
each variant's fastest run.

    cargo build --release
    python scripts/bench_levers.py --preset small --device cpu [--steps 3]
    python scripts/bench_levers.py --preset 125m --device wgpu --variants fused,nosplit,unfused --repeats 2
"""
import argparse
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
VARIANTS = {
    "fused": ("fused head (default)", []),
    "nosplit": ("fused head, no vocabulary split", ["--head-vocab-splits", "1"]),
    "unfused": ("unfused head", ["--unfused-head"]),
    "ops": ("checkpointing: ops", ["--gradient-checkpointing", "ops"]),
    "layers": ("checkpointing: layers", ["--gradient-checkpointing", "layers"]),
    "f16": ("f16 frozen weights", ["--base-dtype", "f16"]),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ual", default="target/release/ual", help="the ual binary")
    p.add_argument("--extra", default="", help="more `ual bench step` flags, e.g. --batch-size 2")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated keys of {', '.join(VARIANTS)}; the first is the baseline")
    p.add_argument("--repeats", type=int, default=1)
    a = p.parse_args()
    keys = a.variants.split(",")
    best = {k: (None, None) for k in keys}
    for _ in range(a.repeats):
        for k in keys:
            name, flags = VARIANTS[k]
            cmd = [a.ual, "bench", "step", "--preset", a.preset, "--device", a.device,
                   "--steps", str(a.steps), "--warmup", str(a.warmup), *a.extra.split(), *flags]
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if out.returncode != 0:
                best[k] = (None, out.stderr.strip().splitlines()[-1])
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {name}: {r['tokens_per_s']:.0f} tok/s", file=sys.stderr)
            if best[k][0] is None or r["tokens_per_s"] > best[k][0]["tokens_per_s"]:
                best[k] = (r, None)
    rows = [(VARIANTS[k][0], *best[k]) for k in keys]
    base = rows[0][1]
    print(f"preset {a.preset} on {base['device']}, {base['tokens_per_step']} tokens/step")
    print()
    print("| variant | tok/s | vs default | peak heap MB | peak RSS MB | peak device MB | final loss |")
    print("|---|---|---|---|---|---|---|")
    for name, r, err in rows:
        if r is None:
            print(f"| {name} | – | – | – | – | – | {err} |")
            continue
        dev = "–" if r["peak_device_bytes"] is None else f"{r['peak_device_bytes'] / 1e6:.0f}"
        heap = "–" if r.get("peak_heap_bytes") is None else f"{r['peak_heap_bytes'] / 1e6:.0f}"
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}× | "
              f"{heap} | {r['peak_rss_bytes'] / 1e6:.0f} | {dev} | {r['final_loss']:.4f} |")


if __name__ == "__main__":
    main()
