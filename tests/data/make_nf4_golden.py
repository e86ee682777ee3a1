"""Regenerates tests/data/nf4_golden.json from bitsandbytes' CPU/default NF4 quantizer.

    pip install --no-deps bitsandbytes==0.50.2
    python tests/data/make_nf4_golden.py

Each case is a block of 64 float32 values chosen to hit the format's edges: values exactly on
every threshold (ties go to the lower code) and one ulp either side, at absmax 1 (exact scale)
and at absmaxes whose reciprocal is inexact (so divide-vs-multiply matters), an all-zero block,
single-nonzero blocks, subnormals, and NaN/Inf. Stored as IEEE bit patterns, with bitsandbytes'
packed bytes and absmax bits.
"""

import json
import os

import numpy as np
import torch

import bitsandbytes.functional as F

BLOCK = 64
HERE = os.path.dirname(os.path.abspath(__file__))


def midpoints() -> torch.Tensor:
    code = F.get_4bit_type("nf4", device="cpu")
    return (code[:-1] + code[1:]) / 2


def blocks() -> list[np.ndarray]:
    out = []
    mids = midpoints().numpy().astype(np.float32)
    for absmax in (1.0, 3.0, 0.1, 7.0, 1e-3, 65504.0):
        a = np.float32(absmax)
        vals = []
        for t in mids:
            x = np.float32(t * a)  # the threshold in weight space (rounded)
            vals += [x, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, np.float32(-np.inf))]
        vals = np.array(vals, dtype=np.float32)
        for start in range(0, len(vals), BLOCK - 1):
            chunk = vals[start:start + BLOCK - 1]
            block = np.zeros(BLOCK, dtype=np.float32)
            block[0] = a  # pins the block's absmax
            block[1:1 + len(chunk)] = chunk
            out.append(block)
    out.append(np.zeros(BLOCK, dtype=np.float32))  # all zero -> 0x77
    single = np.zeros(BLOCK, dtype=np.float32)
    single[17] = np.float32(-2.5)
    out.append(single)
    tiny = np.zeros(BLOCK, dtype=np.float32)
    tiny[5] = np.float32(1e-40)  # subnormal absmax (below the 1e-38 clamp)
    tiny[6] = np.float32(-3e-41)
    tiny[7] = np.float32(7e-41)
    out.append(tiny)
    sub = (np.arange(BLOCK, dtype=np.float32) - 32) * np.float32(1e-39)
    out.append(sub.astype(np.float32))
    nan = np.linspace(-1, 1, BLOCK, dtype=np.float32)
    nan[3] = np.nan
    out.append(nan)
    inf = np.linspace(-1, 1, BLOCK, dtype=np.float32)
    inf[9] = np.inf
    out.append(inf)
    rng = np.random.default_rng(0)
    for _ in range(8):
        out.append(rng.standard_normal(BLOCK).astype(np.float32) * np.float32(rng.uniform(0.01, 10)))
    return out


def main() -> None:
    cases = []
    for block in blocks():
        w = torch.from_numpy(block)
        packed, state = F.quantize_4bit(w, blocksize=BLOCK, quant_type="nf4", compress_statistics=False)
        cases.append({
            "input_bits": [int(v) for v in block.view(np.uint32)],
            "packed": [int(v) for v in packed.flatten().tolist()],
            "absmax_bits": int(state.absmax.numpy().astype(np.float32).view(np.uint32)[0]),
        })
    path = os.path.join(HERE, "nf4_golden.json")
    with open(path, "w") as f:
        json.dump({"blocksize": BLOCK, "source": "bitsandbytes 0.50.2 CPU/default quantize_4bit nf4",
                   "cases": cases}, f)
    print(f"wrote {len(cases)} cases to {path}")


if __name__ == "__main__":
    main()
