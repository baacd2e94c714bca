#!/usr/bin/env bash
# The GGUF path against safetensors on the same real model, side by side in one sitting:
# load time and peak memory (`ual score` of one short text: loading dominates), and tokens/s of
# a LoRA step on the CPU in ual (from the GGUF and from the directory) and in PyTorch + PEFT.
#
#   scripts/fetch-test-models.sh && cargo build --release
#   python scripts/gguf_to_hf.py ~/.cache/ual/test-models/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smol/hf
#   scripts/bench_gguf.sh [GGUF [HF_DIR]]
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF="${1:-${UAL_TEST_MODELS:-$HOME/.cache/ual/test-models}/SmolLM2-135M-Instruct.Q4_1.gguf}"
HF="${2:-/tmp/smol/hf}"
UAL="${UAL:-target/release/ual}"

echo "| model | load + one 8-token forward, s | peak RSS, MiB |"
echo "|---|---:|---:|"
for round in 1 2; do
  for model in "$GGUF" "$HF"; do
    /usr/bin/time -f "%e %M" -o /tmp/ual-bench-time "$UAL" score --device cpu --model "$model" --text "The capital of France is" >/dev/null 2>&1
    read -r secs kib < /tmp/ual-bench-time
    echo "| $(basename "$model") (round $round) | $secs | $((kib / 1024)) |"
  done
done

echo
echo "LoRA step (r 16, every projection), batch 4 × 256 random tokens, CPU:"
for model in "$GGUF" "$HF"; do
  "$UAL" bench step --device cpu --model "$model" --preset small 2>/dev/null | tail -1 |
    python3 -c "import json,sys; d=json.loads(sys.stdin.read()); print(f\"ual   {sys.argv[1]:40s} {d['tokens_per_s']:8.1f} tok/s  peak RSS {d['peak_rss_bytes']/2**20:6.0f} MiB\")" "$(basename "$model")"
done
python3 scripts/bench_torch.py --model "$HF" --preset small --device cpu | tail -1 |
  python3 -c "import json,sys; d=json.loads(sys.stdin.read()); print(f\"torch {sys.argv[1]:40s} {d['tokens_per_s']:8.1f} tok/s  peak RSS {d['peak_rss_bytes']/2**20:6.0f} MiB  ({d['engine']}, {d['options']['threads']} threads)\")" "$(basename "$HF")"
