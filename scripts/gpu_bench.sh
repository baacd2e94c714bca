#!/usr/bin/env bash
# One sitting on a GPU machine: the fused head against the unfused one inside a training step
# (with and without its vocabulary split), ual on wgpu (Vulkan) against PyTorch CUDA + PEFT,
# the fused head alone, a per-kernel profile of ual's 125m step, the memory levers, then the
# small and 1b presets. Most important first; each table is written to $OUT as soon as it is measured, so a
# sitting cut short keeps what it finished.
#
#   cargo build --release                                          # SPIR-V (Vulkan) / MSL (Metal)
#   cargo build --release --no-default-features --target-dir target/wgsl   # WGSL everywhere
#   OUT=/tmp/gpu scripts/gpu_bench.sh            # UAL=path/to/ual for a binary built elsewhere
#
# Needs the Vulkan loader and the vendor's Vulkan driver, and python3 with torch (CUDA),
# transformers and peft. Both engines compute in f32 (PyTorch's TF32 matmuls stay off, its
# default). BIG, SMALL, LARGE and STEPS override the presets and step counts (a rehearsal on
# lavapipe: BIG=tiny SMALL=tiny LARGE=tiny STEPS=1 COMPARE_EXTRA="--torch-device cpu").
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

# Issue 19's table first, sized for one 10-minute sitting: the LoRA step of $BIG and $LARGE at
# sequence lengths 512 and 2048, ual in f32 and f16 (`--precision`; bf16 has no arithmetic under
# WGSL or SPIR-V) from the default build (SPIR-V on Vulkan, tensor-core matmuls where the driver
# lists cooperative matrices), the WGSL build beside it for $BIG, and PyTorch + PEFT with SDPA in
# f32 and in bf16 autocast (its usual setting). Each line is one JSON report (tokens/s, peak
# device memory). Then attention alone (kernel vs burn ops, peak memory by length) and the
# per-kernel profile. FULL=1 runs the older sections after them.
UAL_WGSL=${UAL_WGSL:-target/wgsl/release/ual}
RUN=${STEPS:-3}
for preset in "$BIG" "$LARGE"; do
  for seq in 512 2048; do
    step "$preset LoRA step at $seq tokens"
    for precision in f32 f16; do
      bins="$UAL"
      if [ "$preset" = "$BIG" ] && [ -x "$UAL_WGSL" ]; then bins="$UAL $UAL_WGSL"; fi
      for bin in $bins; do
        echo "# ual $bin $preset seq $seq precision $precision" | tee -a "$OUT/compilers.jsonl.txt"
        timeout 60 "$bin" bench step --device wgpu --preset "$preset" --seq-len "$seq" --batch-size 1 \
          --precision "$precision" --warmup 1 --steps "$RUN" 2>/dev/null | tee -a "$OUT/compilers.jsonl.txt"
      done
    done
    for base in f32 bf16; do
      echo "# torch $preset seq $seq base $base" | tee -a "$OUT/compilers.jsonl.txt"
      timeout 60 python3 scripts/bench_torch.py --preset "$preset" --seq-len "$seq" --batch-size 1 \
        --base-dtype "$base" --warmup 1 --steps "$RUN" | tee -a "$OUT/compilers.jsonl.txt"
    done
  done
done

step "attention alone: flash kernels vs burn ops, 12 heads of 64, peak device memory by length"
timeout 90 "$UAL" bench attention --device wgpu --len 512,1024,2048,4096 --iters 2 2>/dev/null \
  | tee "$OUT/attention.json"

step "kernel profile, $BIG on wgpu"
timeout 120 python3 scripts/profile_kernels.py --ual "$UAL" --preset "$BIG" | tee "$OUT/profile.md"

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
