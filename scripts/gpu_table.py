#!/usr/bin/env python3
"""Issue 19's table from a `scripts/gpu_bench.sh` sitting: its `table.jsonl` (a `#` line naming
each run, then the run's JSON report, or nothing where it failed or timed out) as one Markdown
table, each engine's tokens/s as a ratio of PyTorch + PEFT in bf16 autocast at the same preset
and length, measured in the same sitting.

    python3 scripts/gpu_table.py $OUT/table.jsonl
"""
import json
import re
import sys


def runs(path):
    """(label, report or None) for every `#` line, in order."""
    label, found = None, []
    for line in open(path):
        line = line.strip()
        if line.startswith("#"):
            if label is not None:
                found.append((label, None))
            label = line[1:].strip()
        elif line.startswith("{") and label is not None:
            found.append((label, json.loads(line)))
            label = None
    if label is not None:
        found.append((label, None))
    return found


def row_key(label):
    """(engine, preset, seq, type) from `ual PATH PRESET seq N precision P` or `torch PRESET seq N base B`."""
    words = label.split()
    if words[0] == "torch":
        return "torch", words[1], int(words[3]), words[5]
    return "ual", words[2], int(words[4]), words[6]


def compiler(report):
    """The compiler `bench step` names last in its device description: `(…, spirv)`."""
    m = re.search(r",\s*(\w+)\)\s*$", report.get("device", ""))
    return m[1] if m else "?"


def mb(n):
    return "–" if n is None else f"{n / 1e6:,.0f} MB"


def main():
    found = runs(sys.argv[1])
    torch_bf16 = {}
    for label, report in found:
        engine, preset, seq, kind = row_key(label)
        if report and engine == "torch" and kind == "bf16":
            torch_bf16[(preset, seq)] = report["tokens_per_s"]
    print("| preset | len | engine | type | tok/s | vs PyTorch bf16 | peak device | final loss |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    for label, report in found:
        engine, preset, seq, kind = row_key(label)
        name = "PyTorch + PEFT" if engine == "torch" else f"ual ({compiler(report) if report else '?'})"
        if report is None:
            print(f"| {preset} | {seq} | {name} | {kind} | failed or timed out | | | |")
            continue
        base = torch_bf16.get((preset, seq))
        ratio = f"{report['tokens_per_s'] / base:.2f}×" if base else "–"
        print(f"| {preset} | {seq} | {name} | {kind} | {report['tokens_per_s']:,.0f} | {ratio} | "
              f"{mb(report.get('peak_device_bytes'))} | {report['final_loss']:.5f} |")


if __name__ == "__main__":
    main()
