"""GGUF tensor blocks of every type ual dequantizes, each with gguf-py's dequantization, for
the GGUF reader's tests: ual's dequantizers must reproduce the .f32 files bit for bit.

    pip install gguf numpy && python scripts/make_gguf_block_fixtures.py

Writes tests/fixtures/gguf/blocks/{t}.bin, {t}.f32 and meta.json, for t in f32, f16, bf16,
q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k. {t}.bin is a [rows, cols] tensor stored as
type t in llama.cpp's layout (each row a run of blocks, rows one after another); {t}.f32 is
quants.dequantize of those bytes, rows * cols little-endian f32.

Types gguf-py can quantize get a random normal matrix with a few special rows (zeros, huge
values, tiny values whose block scales are subnormal in f16 or underflow to zero). The
K-quants, which gguf-py only dequantizes, get random bytes whose f16 fields (d, and dmin for
Q4_K and Q5_K) are overwritten with finite values, plus a few special superblocks: 6-bit
scales and mins all 63 (every bit set, so the j >= 4 path of get_scale_min_k4 takes its high
bits), all scales zero, d = dmin = 0, and a subnormal d.
"""
import json
import pathlib

import numpy as np
from gguf import GGMLQuantizationType, quants
from gguf.constants import GGML_QUANT_SIZES

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gguf" / "blocks"
ROWS, COLS = 4, 512  # COLS: a multiple of 256, the K-quants' superblock

T = GGMLQuantizationType
TYPES = [
    ("f32", T.F32), ("f16", T.F16), ("bf16", T.BF16), ("q8_0", T.Q8_0), ("q4_0", T.Q4_0),
    ("q4_1", T.Q4_1), ("q5_0", T.Q5_0), ("q5_1", T.Q5_1), ("q4_k", T.Q4_K), ("q5_k", T.Q5_K),
    ("q6_k", T.Q6_K),
]

# Byte offsets of each K-quant's f16 fields and of its scale bytes within one block.
K_F16_FIELDS = {T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}  # d, dmin / d (at the end)
K_SCALES = {T.Q4_K: (4, 16), T.Q5_K: (4, 16), T.Q6_K: (192, 208)}  # [start, end)


def matrix() -> np.ndarray:
    rng = np.random.default_rng(11)
    m = rng.normal(0, 0.05, size=(ROWS, COLS)).astype(np.float32)
    # Row 1: its first block all zero, its second one huge value (f16 holds it), the rest
    # a wide range of magnitudes.
    m[1, :32] = 0.0
    m[1, 40] = np.float32(-6.0e4)
    m[1, 70] = np.float32(3.0e4)
    m[1, 256:] = rng.normal(0, 1, size=256).astype(np.float32) * np.float32(10.0) ** rng.integers(-4, 4, size=256).astype(np.float32)
    # Row 2: all zero.
    m[2, :] = 0.0
    # Row 3: tiny values. In its first half the block scales are subnormal in f16; in its
    # second half they underflow to zero while the quants (from the f32 scale) do not.
    m[3, :256] *= np.float32(1e-3)
    m[3, 256:] *= np.float32(1e-6)
    return m


def random_k_blocks(qtype: GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = ROWS * COLS // block_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)

    def set_f16(block: int, values: list[float]) -> None:
        for off, v in zip(K_F16_FIELDS[qtype], values):
            blocks[block, off:off + 2] = np.array([v], dtype="<f2").view(np.uint8)

    for b in range(n_blocks):
        set_f16(b, list(rng.uniform(-0.05, 0.05, size=len(K_F16_FIELDS[qtype]))))
    s0, s1 = K_SCALES[qtype]
    per_row = COLS // block_size
    # Row 1, block 0: every scale byte 0xFF (K4: scales and mins all 63; Q6_K: scales all -1).
    blocks[per_row + 0, s0:s1] = 0xFF
    # Row 1, block 1: every scale byte zero.
    blocks[per_row + 1, s0:s1] = 0x00
    # Row 2, block 0: d (and dmin) zero.
    set_f16(2 * per_row + 0, [0.0, 0.0])
    # Row 2, block 1: d subnormal in f16, dmin a plain value.
    set_f16(2 * per_row + 1, [3.0e-6, 0.01])
    if qtype == T.Q6_K:
        # Row 3, block 0: the int8 scales' extremes.
        blocks[3 * per_row, s0:s1] = np.array([-128, 127] * 8, dtype=np.int8).view(np.uint8)
    return blocks.reshape(ROWS, -1)


def k_scales_use_high_bits(blocks: np.ndarray) -> bool:
    """Whether some block's 6-bit scales (Q4_K / Q5_K) have a nonzero high 2-bit part."""
    s = blocks[:, 4:16]
    return bool(np.any((s[:, 0:8] >> 6) != 0))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    m = matrix()
    rng = np.random.default_rng(12)
    meta = {"rows": ROWS, "cols": COLS, "types": {}}
    for name, qtype in TYPES:
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        bytes_per_row = COLS // block_size * type_size
        try:
            raw = np.ascontiguousarray(quants.quantize(m, qtype)).view(np.uint8).reshape(ROWS, bytes_per_row)
            source = "quantized"
        except NotImplementedError:
            raw = random_k_blocks(qtype, rng)
            source = "random"
            if qtype in (T.Q4_K, T.Q5_K):
                assert k_scales_use_high_bits(raw.reshape(-1, type_size)), name
        assert raw.shape == (ROWS, bytes_per_row) and raw.dtype == np.uint8, name
        back = np.asarray(quants.dequantize(raw, qtype), dtype=np.float32).reshape(ROWS, COLS)
        assert np.all(np.isfinite(back)), f"{name}: non-finite dequantized values"
        (OUT / f"{name}.bin").write_bytes(raw.tobytes())
        (OUT / f"{name}.f32").write_bytes(back.astype("<f4").tobytes())
        meta["types"][name] = {
            "ggml_type": int(qtype),
            "block_size": block_size,
            "type_size": type_size,
            "source": source,
        }
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
