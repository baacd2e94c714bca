#!/usr/bin/env bash
# Quantized bases against f16, side by side in one sitting (BENCHMARKS.md, "Quantized bases"):
# peak memory and tokens/s of one LoRA step (r = 16, layer recomputation, batch 1).
#   scripts/bench_quant.sh [PARTS]   PARTS: any of cpu1b lavapipe cpu7b (default: all three)
# Writes one JSON report per line to ${OUT:-runs/bench-quant}/table.jsonl.
set -euo pipefail
UAL=${UAL:-target/release/ual}
OUT=${OUT:-runs/bench-quant}
mkdir -p "$OUT"
step() { # device preset seq base warmup
  echo "== $1 $2 seq $3 $4" >&2
  "$UAL" bench step --device "$1" --preset "$2" --seq-len "$3" --base-dtype "$4" \
    --batch-size 1 --gradient-checkpointing layers --warmup "$5" --steps 1 >> "$OUT/table.jsonl" \
    || echo "{\"failed\": \"$1 $2 $3 $4\"}" >> "$OUT/table.jsonl"
}
for part in ${1:-cpu1b lavapipe cpu7b}; do
  case $part in
    cpu1b) for b in f32 f16 q8_0 q4_0; do step cpu 1b 512 $b 1; done
           [ -n "${LONG:-}" ] && for b in f16 q4_0; do step cpu 1b 2048 $b 0; done ;;
    # On lavapipe an f16 base fails (the 1b step cannot allocate a 250 MB buffer; the 125m
    # step at 512 tokens gets a NaN gradient norm, BENCHMARKS.md): f32 is the baseline there.
    lavapipe) for b in f32 q8_0 q4_0; do step wgpu 125m 256 $b 1; done ;;
    # Warmup 1: the second step's peak, AdamW's moments included; warmup 0: the first step's.
    cpu7b) step cpu 7b 512 f16 0; step cpu 7b 512 q4_0 1
           [ -n "${LONG:-}" ] && { step cpu 7b 2048 q4_0 0; step cpu 7b 2048 q4_0 1; } ;;
  esac
done
