"""Q8_0 and Q4_0 blocks from gguf-py's reference quantizer (llama.cpp's rounding), for
tests/quant.rs: ual's host quantizer must reproduce them byte for byte.

    pip install gguf numpy && python scripts/make_quant_fixtures.py

Writes tests/fixtures/quant/{input.f32, q8_0.bin, q4_0.bin, meta.json}: a [rows, cols] f32
matrix (little-endian) and each format's blocks, row after row, in llama.cpp's layout.
"""
import json
import pathlib

import numpy as np
from gguf import GGMLQuantizationType, quants

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "quant"
ROWS, COLS = 12, 96


def matrix() -> np.ndarray:
    rng = np.random.default_rng(7)
    m = rng.normal(0, 0.05, size=(ROWS, COLS)).astype(np.float32)
    # Row 1: Q8_0 rounding ties. amax = 127 makes d = 1, so x·id = x and halves are ties.
    m[1, :32] = np.float32(127.0)
    m[1, 1:32] = (np.arange(31, dtype=np.float32) - 15.0) + np.float32(0.5)
    # Row 2: Q4_0 ties. max = -8 makes d = 1, id = 1, and x + 8.5 lands on integers and halves.
    m[2, :32] = np.float32(-8.0)
    m[2, 1:32] = (np.arange(31, dtype=np.float32) % 16 - 8.0) * np.float32(0.5)
    # Row 3: all-zero blocks.
    m[3, :] = 0.0
    # Row 4: one huge value per block; the rest flush to zero.
    m[4, 5] = np.float32(3.0e4)
    m[4, 40] = np.float32(-6.0e4)
    m[4, 90] = np.float32(1.0e-3)
    # Row 5: the largest magnitude appears twice with opposite signs (Q4_0 keeps the first).
    m[5, 3], m[5, 9] = np.float32(0.75), np.float32(-0.75)
    # Row 6: tiny values whose scale is subnormal in f16.
    m[6, :] *= np.float32(1e-6)
    # Row 7: a wide range of magnitudes.
    m[7, :] = rng.normal(0, 1, size=COLS).astype(np.float32) * np.float32(10.0) ** rng.integers(-4, 4, size=COLS).astype(np.float32)
    return m


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    m = matrix()
    (OUT / "input.f32").write_bytes(m.astype("<f4").tobytes())
    for name, qtype in [("q8_0", GGMLQuantizationType.Q8_0), ("q4_0", GGMLQuantizationType.Q4_0)]:
        blocks = quants.quantize(m, qtype)
        (OUT / f"{name}.bin").write_bytes(np.ascontiguousarray(blocks).tobytes())
        back = quants.dequantize(blocks, qtype).astype("<f4")
        (OUT / f"{name}.dequantized.f32").write_bytes(back.tobytes())
    (OUT / "meta.json").write_text(json.dumps({"rows": ROWS, "cols": COLS}) + "\n")


if __name__ == "__main__":
    main()
