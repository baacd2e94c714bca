#!/usr/bin/env bash
# One sitting on a GPU machine, most important first: issue 19's table (ual's LoRA step in f16 and
# f32 under SPIR-V/MSL and WGSL against PyTorch + PEFT in bf16 autocast and f32, `1b` and `125m`
# at 512 and 2048 tokens), attention alone, a per-kernel profile, the fused head against the
# unfused one; FULL=1 adds the older sections (memory levers, the fused head alone, `small`).
# Each result is written to $OUT as soon as it is measured, so a sitting cut short keeps what it
# finished; PARTS="large big rest attention profile fused" picks and orders the first sections.
#
#   cargo build --release                                          # SPIR-V (Vulkan) / MSL (Metal)
#   cargo build --release --no-default-features --target-dir target/wgsl   # WGSL everywhere
#   OUT=/tmp/gpu scripts/gpu_bench.sh            # UAL=path/to/ual for a binary built elsewhere
#
# Needs the Vulkan loader and the vendor's Vulkan driver, and python3 with torch (CUDA),
# transformers and peft. A stripped release binary is about 95 MB (16 MB xz-compressed), which
# matters where the binary must be carried to the GPU machine. BIG, SMALL, LARGE and STEPS
# override the presets and step counts (a rehearsal on lavapipe: BIG=tiny SMALL=tiny LARGE=tiny
# STEPS=1 COMPARE_EXTRA="--torch-device cpu").
set -uo pipefail
cd "$(dirname "$0")/.."
UAL=${UAL:-target/release/ual}
OUT=${OUT:-/tmp/ual-gpu}
BIG=${BIG:-125m} SMALL=${SMALL:-small} LARGE=${LARGE:-1b}
mkdir -p "$OUT"
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
export PYTHONUNBUFFERED=1
step() { echo; echo "== $* ($(date +%T))"; }

step machine
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__)"
"$UAL" devices | tee "$OUT/devices.txt"

# Issue 19's table first, sized for one 10-minute sitting, most important first: the LoRA step
# of $LARGE and $BIG at sequence lengths 2048 and 512, ual in f16 and f32 (`--precision`; bf16
# has no arithmetic under WGSL or SPIR-V) from the default build (SPIR-V on Vulkan, tensor-core
# matmuls where the driver lists cooperative matrices), the WGSL build beside it for $BIG, and
# PyTorch + PEFT with SDPA in bf16 autocast (its usual setting) and f32. Each result is one JSON
# line in $OUT/table.jsonl, after a `#` line naming it (tokens/s, peak device memory, final loss:
# the same seed gives the same loss under either compiler). Then attention alone, the per-kernel
# profile, and the fused head against the unfused one. FULL=1 runs the older sections after them.
UAL_WGSL=${UAL_WGSL:-target/wgsl/release/ual}
RUN=${STEPS:-3}
LOG="$OUT/log.txt"
ual_step() { # binary preset seq precision
  echo "# ual $1 $2 seq $3 precision $4" | tee -a "$OUT/table.jsonl"
  timeout "${UAL_TIMEOUT:-50}" "$1" bench step --device wgpu --preset "$2" --seq-len "$3" \
    --batch-size 1 --precision "$4" --warmup 1 --steps "$RUN" 2>>"$LOG" | tee -a "$OUT/table.jsonl"
}
torch_step() { # preset seq base
  echo "# torch $1 seq $2 base $3" | tee -a "$OUT/table.jsonl"
  timeout "${TORCH_TIMEOUT:-45}" python3 scripts/bench_torch.py --preset "$1" --seq-len "$2" \
    --batch-size 1 --base-dtype "$3" --warmup 1 --steps "$RUN" 2>>"$LOG" | tee -a "$OUT/table.jsonl"
}
for part in ${PARTS:-large big rest attention profile fused}; do
  case "$part" in
    large) step "$LARGE LoRA step at 2048 tokens"
      ual_step "$UAL" "$LARGE" 2048 f16; torch_step "$LARGE" 2048 bf16
      ual_step "$UAL" "$LARGE" 2048 f32; torch_step "$LARGE" 2048 f32 ;;
    big) step "$BIG LoRA step at 512 tokens"
      ual_step "$UAL" "$BIG" 512 f16; torch_step "$BIG" 512 bf16
      ual_step "$UAL" "$BIG" 512 f32; torch_step "$BIG" 512 f32
      if [ -x "$UAL_WGSL" ]; then ual_step "$UAL_WGSL" "$BIG" 512 f32; ual_step "$UAL_WGSL" "$BIG" 512 f16; fi ;;
    rest) step "$BIG at 2048 tokens, $LARGE at 512"
      ual_step "$UAL" "$BIG" 2048 f16; torch_step "$BIG" 2048 bf16
      ual_step "$UAL" "$LARGE" 512 f16; torch_step "$LARGE" 512 bf16
      ual_step "$UAL" "$BIG" 2048 f32; torch_step "$BIG" 2048 f32 ;;
    attention) step "attention alone: flash kernels vs burn ops, 12 heads of 64, peak device memory by length"
      timeout 60 "$UAL" bench attention --device wgpu --len 512,2048,4096 --iters 2 2>>"$LOG" \
        | tee "$OUT/attention.json" ;;
    profile) step "kernel profile, $BIG f16 (batch 4 × 512) on wgpu"
      timeout 60 python3 scripts/profile_kernels.py --ual "$UAL" --preset "$BIG" \
        --extra="--precision f16" 2>>"$LOG" | tee "$OUT/profile.md" ;;
    fused) step "fused vs unfused head in a training step, $BIG f16 on wgpu"
      timeout 90 python3 scripts/bench_levers.py --ual "$UAL" --preset "$BIG" --device wgpu \
        --variants fused,unfused --repeats 1 --steps "$RUN" --warmup 1 \
        --extra="--precision f16" 2>>"$LOG" | tee "$OUT/fused-step.md" ;;
  esac
done
[ -s "$OUT/table.jsonl" ] && python3 scripts/gpu_table.py "$OUT/table.jsonl" | tee "$OUT/table.md"

if [ "${FULL:-0}" != 1 ]; then
  echo; echo "done (FULL=1 runs the older sections too)"; exit 0
fi

step "fused vs unfused head in a training step, $BIG on wgpu"
python3 scripts/bench_levers.py --ual "$UAL" --preset "$BIG" --device wgpu \
  --variants fused,nosplit,unfused --repeats 2 --steps "${STEPS:-10}" --warmup 3 \
  | tee "$OUT/fused-step.md"

step "ual (wgpu) vs PyTorch CUDA + PEFT: $BIG"
python3 scripts/bench_step_compare.py --ual "$UAL" --device wgpu --presets "$BIG" \
  --repeats 2 --steps "${STEPS:-10}" --warmup 3 ${COMPARE_EXTRA:-} | tee "$OUT/compare.md"

step "fused head alone, 4096 rows, wgpu: vocabulary split by default, then without"
for v in 32000 128256; do
  for splits in 0 1; do
    "$UAL" bench head --device wgpu --rows 4096 --hidden 512 --vocab "$v" --iters "${STEPS:-5}" \
      --vocab-splits "$splits" 2>&1 | tee -a "$OUT/head.txt"
  done
done


step "memory levers, $BIG on wgpu"
python3 scripts/bench_levers.py --ual "$UAL" --preset "$BIG" --device wgpu \
  --steps "${STEPS:-3}" --warmup 2 | tee "$OUT/levers.md"


step "ual (wgpu) vs PyTorch CUDA + PEFT: $SMALL and $LARGE"
python3 scripts/bench_step_compare.py --ual "$UAL" --device wgpu --presets "$SMALL" "$LARGE" \
  --repeats 1 --steps "${STEPS:-3}" --warmup 2 ${COMPARE_EXTRA:-} | tee "$OUT/compare-more.md"
step done
