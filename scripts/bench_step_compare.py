#!/usr/bin/env python3
"""Runs `ual bench step` and scripts/bench_torch.py side by side (alternating, same machine,
same sitting) and prints a Markdown table of tokens/s and memory with ual/torch ratios.

    cargo build --release
    python scripts/bench_step_compare.py --presets tiny small --device cpu [--repeats 2]

Each configuration runs `--repeats` times per engine, alternating; the table keeps the best
tokens/s of each (the least disturbed run) and the memory of that run.
"""
import argparse
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(cmd):
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mb(x):
    return "–" if x is None else f"{x / 1e6:.0f}"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--device", default="cpu", help="ual's --device; torch gets cpu or cuda")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ual-extra", default="", help="extra `ual bench step` flags")
    p.add_argument("--ual", default="target/release/ual", help="the ual binary")
    p.add_argument("--torch-device", help="default: cpu for ual's cpu, else cuda")
    a = p.parse_args()
    torch_device = a.torch_device or ("cpu" if a.device == "cpu" else "cuda")
    rows = []
    for preset in a.presets:
        common = ["--preset", preset, "--steps", str(a.steps), "--warmup", str(a.warmup)]
        ual_cmd = [a.ual, "bench", "step", "--device", a.device, *common,
                   *a.ual_extra.split()]
        torch_cmd = [sys.executable, "scripts/bench_torch.py", "--device", torch_device, *common]
        best = {}
        for _ in range(a.repeats):
            for name, cmd in [("ual", ual_cmd), ("torch", torch_cmd)]:
                r = run(cmd)
                if name not in best or r["tokens_per_s"] > best[name]["tokens_per_s"]:
                    best[name] = r
        u, t = best["ual"], best["torch"]
        rows.append((preset, u, t))
        print(json.dumps(dict(preset=preset, ual=u, torch=t)), file=sys.stderr)
    print(f"ual: {rows[0][1]['engine']} on {rows[0][1]['device']}; torch: {rows[0][2]['engine']} on {rows[0][2]['device']}")
    print()
    print("| preset | tokens/step | ual tok/s | torch tok/s | ual / torch | ual peak RSS MB | torch peak RSS MB | ual peak device MB | torch peak device MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset, u, t in rows:
        print(f"| {preset} | {u['tokens_per_step']} | {u['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} | "
              f"{u['tokens_per_s'] / t['tokens_per_s']:.2f}× | {mb(u['peak_rss_bytes'])} | {mb(t['peak_rss_bytes'])} | "
              f"{mb(u['peak_device_bytes'])} | {mb(t['peak_device_bytes'])} |")


if __name__ == "__main__":
    main()
