#!/usr/bin/env python3
"""What a real GGUF consumer makes of the files ual writes: llama.cpp (through
llama-cpp-python) loads `ual merge --format gguf` and `ual export --format gguf` outputs, and
gguf-py lists them. tests/gguf.rs writes the same files again and compares.

    scripts/fetch-test-models.sh
    pip install gguf numpy llama-cpp-python      # llama-cpp-python compiles llama.cpp
    cargo build --release && python scripts/make_gguf_out_fixtures.py [UAL_BIN]

Writes tests/fixtures/smollm2/:
- llama_cpp.json: per-token log-probs (log_softmax of llama.cpp's logits, float64) of a few
  texts under (a) SmolLM2 with tests/fixtures/smollm2/adapter merged, written as f16 GGUF, and
  (b) the base converted to f16 by llama.cpp's own quantizer (`llama_model_quantize`, so that
  llama.cpp's Q8_1 activations against Q4_1 weights, ~0.2 nats of its own, do not hide the
  adapter) with the adapter exported as LoRA GGUF applied by llama.cpp (`lora_path`, scale 1);
  and (c) that f16 base alone. With llama-cpp-python's version.
- llama_cpp_llama_gqa.json: the same for tests/fixtures/models/llama-gqa (a safetensors model
  with Llama 2's SentencePiece tokenizer) merged with tests/fixtures/adapters/llama-gqa-peft
  as f16 GGUF: ual's conversion of a Hugging Face tokenizer, read back by llama.cpp.
- gguf_py_view.json: gguf-py's reading of both files: every metadata key with its value type
  (and scalar value), every tensor's name, type and shape.
"""
import ctypes
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import gguf
import llama_cpp

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "smollm2"
GGUF = pathlib.Path(os.environ.get("UAL_TEST_MODELS", pathlib.Path.home() / ".cache/ual/test-models")) / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n",
    "Tokens 12 345 and café, 東京, tabs\tand  spaces.",
]


def logprobs(model: llama_cpp.Llama, text: str, add_bos: bool = False) -> dict:
    """Per-token log-probs of `text` (with a BOS where the file's add_bos_token asks for one)."""
    ids = model.tokenize(text.encode(), add_bos=add_bos, special=True)
    model.reset()
    model.eval(ids)
    logits = np.array(model.scores[: len(ids)], dtype=np.float64)
    z = logits - logits.max(-1, keepdims=True)
    lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return {"text": text, "ids": ids, "logprobs": [float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1)]}


def view(path: pathlib.Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        entry = {"type": field.types[0].name}
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            entry["items"] = field.types[-1].name
            entry["len"] = len(field.data)
        else:
            value = field.contents()
            entry["value"] = value if not isinstance(value, float) else float(np.float32(value))
        metadata[key] = entry
    tensors = [{"name": t.name, "type": t.tensor_type.name, "dims": [int(d) for d in t.shape]} for t in reader.tensors]
    return {"metadata": metadata, "tensors": tensors}


def main() -> None:
    ual = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "target/release/ual")
    adapter = OUT / "adapter"
    tmp = pathlib.Path(tempfile.mkdtemp())
    merged, lora = tmp / "merged-f16.gguf", tmp / "adapter.gguf"
    subprocess.run([ual, "merge", "--device", "cpu", "--model", str(GGUF), "--adapter", str(adapter),
                    "--format", "gguf", "--dtype", "f16", "--output", str(merged)], check=True)
    subprocess.run([ual, "export", "--device", "cpu", "--model", str(GGUF), "--adapter", str(adapter),
                    "--format", "gguf", "--output", str(lora)], check=True)
    base_f16 = tmp / "base-f16.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = 1, True, 2  # LLAMA_FTYPE_MOSTLY_F16
    assert llama_cpp.llama_model_quantize(str(GGUF).encode(), str(base_f16).encode(), ctypes.byref(params)) == 0
    common = dict(logits_all=True, verbose=False, n_ctx=512, n_threads=2, seed=0)
    merged_model = llama_cpp.Llama(str(merged), **common)
    lora_model = llama_cpp.Llama(str(base_f16), lora_path=str(lora), **common)
    base_model = llama_cpp.Llama(str(base_f16), **common)
    (OUT / "llama_cpp.json").write_text(json.dumps({
        "llama_cpp_python": llama_cpp.__version__,
        "merged_f16": [logprobs(merged_model, t) for t in TEXTS],
        "base_f16_with_lora": [logprobs(lora_model, t) for t in TEXTS],
        "base_f16": [logprobs(base_model, t) for t in TEXTS],
    }, indent=1) + "\n")
    gqa = tmp / "llama-gqa-f16.gguf"
    subprocess.run([ual, "merge", "--device", "cpu", "--model", str(ROOT / "tests/fixtures/models/llama-gqa"),
                    "--adapter", str(ROOT / "tests/fixtures/adapters/llama-gqa-peft"),
                    "--format", "gguf", "--dtype", "f16", "--output", str(gqa)], check=True)
    gqa_model = llama_cpp.Llama(str(gqa), **common)
    gqa_texts = ["Hello world, this is a test.", "Below is an instruction.\n\n### Response:\n  12 345 café 東京 </s> done"]
    (OUT / "llama_cpp_llama_gqa.json").write_text(json.dumps({
        "llama_cpp_python": llama_cpp.__version__,
        "merged_f16": [logprobs(gqa_model, t, add_bos=True) for t in gqa_texts],
    }, indent=1) + "\n")
    (OUT / "gguf_py_view.json").write_text(json.dumps({
        "gguf_py": getattr(gguf, "__version__", "unknown"),
        "merged_f16": view(merged),
        "adapter": view(lora),
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
