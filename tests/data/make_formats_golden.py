"""Regenerates tests/data/formats_golden.json from bitsandbytes' CPU/default quantizers: the
formats next to NF4 (see make_nf4_golden.py), so tests/test_formats.py checks bit-exactness
without bitsandbytes installed.

    pip install --no-deps bitsandbytes==0.50.2
    python tests/data/make_formats_golden.py

* "fp4": blocks of 64 float32 values on every FP4 threshold and one ulp either side, at exact
  and inexact scales, +0/-0 and tiny values around the two zero codes, all-zero, NaN and Inf
  blocks -> ``quantize_4bit(fp4)`` packed bytes and absmax bits.
* "double_quant": per-matrix fp32 absmax rows (random of several lengths, partial last group,
  constant rows, rows with NaN/Inf/zero, values landing on the dynamic map's midpoints) ->
  bitsandbytes' compress_statistics: ``offset = absmax.mean()``, ``quantize_blockwise(absmax -
  offset, blocksize=256)`` codes, group absmax bits and offset bits.
* "int8": [N, K] float32 matrices (ties at .5 after scaling, all-zero, NaN, Inf and subnormal
  rows, random) -> ``int8_vectorwise_quant`` codes and row-absmax bits.
* "dynamic_map": ``create_dynamic_map(signed=True)`` as bits.
All floats are stored as IEEE bit patterns.
"""

import json
import os

import numpy as np
import torch

import bitsandbytes.functional as F

BLOCK = 64
HERE = os.path.dirname(os.path.abspath(__file__))


def bits(a) -> list[int]:
    return [int(v) for v in np.asarray(a, dtype=np.float32).reshape(-1).view(np.uint32)]


def fp4_blocks() -> list[np.ndarray]:
    code = F.get_4bit_type("fp4", device="cpu")
    order = torch.argsort(code)
    mids = ((code[order[:-1]] + code[order[1:]]) / 2).numpy().astype(np.float32)
    out = []
    for absmax in (1.0, 3.0, 0.1, 7.0):
        a = np.float32(absmax)
        vals = []
        for t in mids:
            x = np.float32(t * a)
            vals += [x, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, np.float32(-np.inf))]
        vals = np.array(vals, dtype=np.float32)
        for start in range(0, len(vals), BLOCK - 1):
            block = np.zeros(BLOCK, dtype=np.float32)
            block[0] = -a  # pins the block's absmax (negative: the -1 code)
            chunk = vals[start:start + BLOCK - 1]
            block[1:1 + len(chunk)] = chunk
            out.append(block)
    zeros = np.zeros(BLOCK, dtype=np.float32)
    zeros[1::2] = np.float32(-0.0)
    zeros[0] = np.float32(1.0)
    zeros[2:10] = np.array([1e-3, -1e-3, 2.6e-3, -2.6e-3, 2.7e-3, -2.7e-3, 1e-30, -1e-30], dtype=np.float32)
    out.append(zeros)
    out.append(np.zeros(BLOCK, dtype=np.float32))
    nan = np.linspace(-1, 1, BLOCK, dtype=np.float32)
    nan[3] = np.nan
    out.append(nan)
    inf = np.linspace(-1, 1, BLOCK, dtype=np.float32)
    inf[9] = -np.inf
    out.append(inf)
    rng = np.random.default_rng(1)
    for _ in range(6):
        out.append(rng.standard_normal(BLOCK).astype(np.float32) * np.float32(rng.uniform(0.01, 10)))
    return out


def absmax_rows() -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    rows = [np.abs(rng.standard_normal(n)).astype(np.float32) * np.float32(s)
            for n, s in ((256, 1.0), (300, 0.02), (1000, 3.0), (64, 1e-3), (513, 1.0))]
    rows.append(np.full(256, 0.25, dtype=np.float32))  # constant: absmax - offset is all zero
    holes = np.abs(rng.standard_normal(300)).astype(np.float32)
    holes[[0, 7, 260]] = 0.0  # all-zero blocks of the weight
    rows.append(holes)
    nan = np.abs(rng.standard_normal(260)).astype(np.float32)
    nan[5] = np.nan
    rows.append(nan)
    inf = np.abs(rng.standard_normal(260)).astype(np.float32)
    inf[258] = np.inf
    rows.append(inf)
    # values whose (absmax - offset) / group absmax lands on the map's midpoints and grid points
    code = F.create_dynamic_map(signed=True).numpy().astype(np.float32)
    mids = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    on_mids = np.concatenate([mids, [np.float32(-1.0), np.float32(1.0)]]).astype(np.float32)
    rows.append((on_mids - on_mids.mean(dtype=np.float32)).astype(np.float32) + np.float32(2.0))
    return rows


def int8_matrices() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    ties = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5],
                     [254.0, 1.0, 3.0, 5.0, -1.0, -3.0, 253.0, 0.0]], dtype=np.float32)
    special = np.array([[0.0] * 8,
                        [np.nan, 1.0, -2.0, 3.0, 0.0, 0.5, 0.25, 1.0],
                        [np.inf, 1.0, -2.0, 3.0, 0.0, 0.5, 0.25, 1.0],
                        [1e-40, -3e-41, 0.0, 7e-41, 0.0, 0.0, 0.0, 0.0],
                        [1e30, -1e30, 254.0, 1.0, 0.0, -0.0, 3e29, -2e29]], dtype=np.float32)
    return [ties, special, rng.standard_normal((16, 48)).astype(np.float32),
            (rng.standard_normal((8, 64)) * 1e-3).astype(np.float32)]


def main() -> None:
    fp4 = []
    for block in fp4_blocks():
        packed, state = F.quantize_4bit(torch.from_numpy(block), blocksize=BLOCK, quant_type="fp4")
        fp4.append({"input_bits": bits(block), "packed": [int(v) for v in packed.flatten().tolist()],
                    "absmax_bits": bits(state.absmax.numpy())[0]})
    dq = []
    for row in absmax_rows():
        a = torch.from_numpy(row)
        offset = a.mean()
        codes, state2 = F.quantize_blockwise(a - offset, blocksize=256)
        dq.append({"absmax_bits": bits(row), "codes": [int(v) for v in codes.tolist()],
                   "scale_bits": bits(state2.absmax.numpy()), "offset_bits": bits(offset.numpy())[0]})
    int8 = []
    for m in int8_matrices():
        q, stats, _ = torch.ops.bitsandbytes.int8_vectorwise_quant(torch.from_numpy(m.copy()), 0.0)
        int8.append({"shape": list(m.shape), "input_bits": bits(m), "codes": [int(v) for v in q.flatten().tolist()],
                     "row_absmax_bits": bits(stats.numpy())})
    path = os.path.join(HERE, "formats_golden.json")
    with open(path, "w") as f:
        json.dump({"source": "bitsandbytes 0.50.2 CPU/default: quantize_4bit(fp4), quantize_blockwise (dynamic map, "
                             "blocksize 256) after subtracting the mean, int8_vectorwise_quant",
                   "blocksize": BLOCK, "dynamic_map_bits": bits(F.create_dynamic_map(signed=True).numpy()),
                   "fp4": fp4, "double_quant": dq, "int8": int8}, f)
    print(f"wrote {len(fp4)} fp4, {len(dq)} double-quant, {len(int8)} int8 cases to {path}")


if __name__ == "__main__":
    main()
