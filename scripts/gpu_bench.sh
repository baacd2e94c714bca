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

# The compilers first: the same step from the default build (SPIR-V on Vulkan, tensor-core
# matmuls where the driver lists cooperative matrices) and the WGSL build, alternating, at two
# sequence lengths, with f32 and f16 frozen weights. Each line is one `bench step` JSON report.
UAL_WGSL=${UAL_WGSL:-target/wgsl/release/ual}
if [ -x "$UAL_WGSL" ]; then
  step "compilers: $BIG LoRA step, default build vs --no-default-features (WGSL)"
  for seq in 512 2048; do
    for base in f32 f16; do
      for bin in "$UAL" "$UAL_WGSL"; do
        echo "# $bin seq $seq base $base" | tee -a "$OUT/compilers.jsonl.txt"
        timeout 120 "$bin" bench step --device wgpu --preset "$BIG" --seq-len "$seq" --batch-size 1 \
          --base-dtype "$base" --warmup 2 --steps "${STEPS:-5}" 2>/dev/null | tee -a "$OUT/compilers.jsonl.txt"
      done
    done
    # PyTorch + PEFT beside them, SDPA attention: f32, and bf16 autocast (its usual setting).
    for base in f32 bf16; do
      echo "# torch seq $seq base $base" | tee -a "$OUT/compilers.jsonl.txt"
      timeout 120 python3 scripts/bench_torch.py --preset "$BIG" --seq-len "$seq" --batch-size 1 \
        --base-dtype "$base" --warmup 2 --steps "${STEPS:-5}" | tee -a "$OUT/compilers.jsonl.txt"
    done
  done
else
  echo "no WGSL build at $UAL_WGSL: the compiler comparison is skipped"
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

step "kernel profile, $BIG on wgpu"
python3 scripts/profile_kernels.py --ual "$UAL" --preset "$BIG" | tee "$OUT/profile.md"

step "memory levers, $BIG on wgpu"
python3 scripts/bench_levers.py --ual "$UAL" --preset "$BIG" --device wgpu \
  --steps "${STEPS:-3}" --warmup 2 | tee "$OUT/levers.md"


step "ual (wgpu) vs PyTorch CUDA + PEFT: $SMALL and $LARGE"
python3 scripts/bench_step_compare.py --ual "$UAL" --device wgpu --presets "$SMALL" "$LARGE" \
  --repeats 1 --steps "${STEPS:-3}" --warmup 2 ${COMPARE_EXTRA:-} | tee "$OUT/compare-more.md"
step done
