"""Generates tests/data/quant_vectors.json: blocks and their dequantized values, computed by
the `gguf` Python package (an implementation independent of pregate).

    pip install gguf numpy && python3 tests/data/gen_quant_vectors.py [model.gguf]

Random blocks cover every type; when a model path is given, real blocks of the types it
holds are added too. Legacy types (Q4_0, Q5_0, Q8_0) also record gguf's quantize output.
"""
import json
import sys

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFReader
from gguf.quants import dequantize, quantize

rng = np.random.default_rng(1234)
BLOCK = {T.F32: (1, 4), T.F16: (1, 2), T.BF16: (1, 2), T.Q4_0: (32, 18), T.Q5_0: (32, 22),
         T.Q8_0: (32, 34), T.Q4_K: (256, 144), T.Q5_K: (256, 176), T.Q6_K: (256, 210)}


def random_blocks(t, n_blocks):
    """Random bytes with sane f16 scales, so values stay finite."""
    qk, size = BLOCK[t]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    def f16(col, lo=0.001, hi=0.05):
        raw[:, col:col + 2] = np.frombuffer(
            rng.uniform(lo, hi, n_blocks).astype(np.float16).tobytes(), np.uint8).reshape(n_blocks, 2)
    if t in (T.Q4_0, T.Q5_0, T.Q8_0):
        f16(0)
    elif t in (T.Q4_K, T.Q5_K):
        f16(0); f16(2)
    elif t == T.Q6_K:
        f16(208)
    return raw.reshape(-1)


cases = []
for t, (qk, size) in BLOCK.items():
    if t in (T.F32, T.F16, T.BF16):
        vals = rng.standard_normal(256).astype(np.float32)
        data = np.ascontiguousarray(quantize(vals.reshape(1, -1), t)).view(np.uint8).reshape(-1)
    else:
        data = random_blocks(t, 4 if qk == 256 else 16)
    n = len(data) // size * qk
    out = dequantize(data.reshape(1, -1), t).reshape(-1)
    assert len(out) == n
    case = {"type": t.name, "source": "random", "bytes": data.tobytes().hex(),
            "values": [float(v) for v in out]}
    cases.append(case)
    if t in (T.Q4_0, T.Q5_0, T.Q8_0):
        x = rng.standard_normal(256).astype(np.float32)
        q = np.ascontiguousarray(quantize(x.reshape(1, -1), t)).view(np.uint8).reshape(-1)
        cases.append({"type": t.name, "source": "gguf-quantize", "input": [float(v) for v in x],
                      "bytes": q.tobytes().hex(),
                      "values": [float(v) for v in dequantize(q.reshape(1, -1), t).reshape(-1)]})

if len(sys.argv) > 1:
    seen = set()
    for tensor in GGUFReader(sys.argv[1]).tensors:
        t = tensor.tensor_type
        if t in BLOCK and t not in seen and t != T.F32:
            seen.add(t)
            qk, size = BLOCK[t]
            data = np.asarray(tensor.data).view(np.uint8).reshape(-1)[: size * (2 if qk == 256 else 8)]
            cases.append({"type": t.name, "source": "model:" + tensor.name, "bytes": data.tobytes().hex(),
                          "values": [float(v) for v in dequantize(data.reshape(1, -1), t).reshape(-1)]})

json.dump(cases, open("tests/data/quant_vectors.json", "w"))
print(len(cases), "cases")
