#!/bin/sh
# The decoding table of BENCHMARKS.md (issue 34): ual bench decode and transformers side by side
# on SmolLM2-135M (SMOL: an f32 Hugging Face copy, from scripts/gguf_to_hf.py) and the 125m
# shape, then lavapipe against the CPU. One line per measurement: engine, model, batch, new
# tokens, tokens/s, time to first token (s), peak memory (MiB), what the memory counts.
export XDG_RUNTIME_DIR=/tmp
U=${UAL:-target/release/ual}  # a --no-default-features (WGSL) build, for lavapipe
cd "$(dirname "$0")/.."
show='import json,sys; d=json.load(sys.stdin); print(sys.argv[1], d["model"][:24], d["batch_size"], d["new_tokens"], round(d["tokens_per_s"],1), round(d["time_to_first_token_s"],3), d["peak_memory_bytes"]>>20, d["memory_source"], flush=True)'
for spec in "1 100" "1 500" "16 100"; do set -- $spec
  $U bench decode --model ${SMOL:-/tmp/smol/hf} --device cpu --batch-size $1 --new-tokens $2 2>/dev/null | python3 -c "$show" ual-cpu
  python3 scripts/bench_decode_torch.py --model ${SMOL:-/tmp/smol/hf} --batch-size $1 --new-tokens $2 2>/dev/null | python3 -c "$show" transformers
  $U bench decode --preset 125m --device cpu --batch-size $1 --new-tokens $2 2>/dev/null | python3 -c "$show" ual-cpu
  python3 scripts/bench_decode_torch.py --preset 125m --batch-size $1 --new-tokens $2 2>/dev/null | python3 -c "$show" transformers
done
for spec in "1 100" "16 100"; do set -- $spec
  $U bench decode --device wgpu --batch-size $1 --new-tokens $2 2>/dev/null | python3 -c "$show" ual-lavapipe
  $U bench decode --device cpu --batch-size $1 --new-tokens $2 2>/dev/null | python3 -c "$show" ual-cpu
done
$U bench decode --model ${SMOL:-/tmp/smol/hf} --device wgpu --new-tokens 100 2>/dev/null | python3 -c "$show" ual-lavapipe
$U bench decode --preset 125m --device wgpu --new-tokens 100 2>/dev/null | python3 -c "$show" ual-lavapipe
echo DONE
