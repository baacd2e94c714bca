#!/usr/bin/env python3
"""Where a `ual bench step` on wgpu spends its GPU time, kernel by kernel.

CubeCL can time every kernel it launches (it synchronises after each one, so the step runs
slower, but each duration is the kernel's own). This script writes the `cubecl.toml` that turns
that on, runs the step, finds one steady-state training step in the log (the last stretch of
kernel launches that repeats the stretch before it exactly: autotune and warm-up steps launch
more), and prints the kernels of that step grouped by name, largest share first.

    cargo build --release
    python scripts/profile_kernels.py --preset 125m [--ual target/release/ual] [--top 25]
"""
import argparse
import collections
import os
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
# One launch: "| 1.234ms | Name_hash [| generic | ...]"; summary-table rows start with a name.
LAUNCH = re.compile(r"^\|\s*([0-9.]+)(ns|µs|us|ms|s)\s*\|(.*)$")
UNIT = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def launches(log):
    for line in log.splitlines():
        m = LAUNCH.match(line)
        if m:
            yield kernel_name(m[3]), float(m[1]) * UNIT[m[2]]


def kernel_name(rest):
    """`SourceKernel | UalCeKernel_hash` → UalCeKernel; a matmul keeps its algorithm family."""
    parts = [x.strip() for x in rest.split("|") if x.strip()]
    name = parts[1] if parts[0] == "SourceKernel" and len(parts) > 1 else parts[0]
    family = [x for x in parts if x.endswith("Family")]
    if family:
        name += f" ({family[0]})"
    return re.sub(r"_[0-9a-f]{8}$", "", name)


def last_step(runs):
    """The longest tail that repeats the stretch just before it: one steady-state step.

    Shorter repeats exist inside a step (identical decoder layers); longer ones cannot, because
    the first step autotunes and launches more."""
    names = [n for n, _ in runs]
    periods = [p for p in range(1, len(names) // 2 + 1) if names[-p:] == names[-2 * p:-p]]
    if not periods:
        sys.exit("no repeating step found: run with --steps 2 or more")
    return runs[-max(periods):]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="125m")
    p.add_argument("--ual", default=str(ROOT / "target/release/ual"))
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--extra", default="", help="more `ual bench step` flags")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log = pathlib.Path(tmp) / "kernels.log"
        (pathlib.Path(tmp) / "cubecl.toml").write_text(
            f'[profiling.logger]\nlevel = "basic"\nfile = "{log}"\nappend = false\n')
        cmd = [os.path.abspath(a.ual), "bench", "step", "--preset", a.preset, "--device", "wgpu",
               "--warmup", "2", "--steps", "2", *a.extra.split()]
        out = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
        step = last_step(list(launches(log.read_text())))
    total = sum(t for _, t in step)
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for name, t in step:
        by_name[name][0] += t
        by_name[name][1] += 1
    print(f"one step of `{' '.join(cmd[1:])}`: {len(step)} kernel launches, "
          f"{total * 1e3:.1f} ms of kernel time (each launch timed alone)")
    print()
    print("| kernel | launches | ms | share |")
    print("|---|---|---|---|")
    for name, (t, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:a.top]:
        print(f"| {name} | {n} | {t * 1e3:.2f} | {100 * t / total:.1f} % |")


if __name__ == "__main__":
    main()
