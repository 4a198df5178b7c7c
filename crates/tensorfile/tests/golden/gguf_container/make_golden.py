#!/usr/bin/env python3
"""Writes the GGUF container goldens with gguf-py's own GGUFWriter.

Run from anywhere with a Python that has pip `gguf` (0.19 was used) and numpy:

    /work/pyref/bin/python crates/tensorfile/tests/golden/gguf_container/make_golden.py

Outputs (next to this script), read by crates/tensorfile/tests/gguf_container_golden.rs:
- `basic.gguf` + `basic.json`: metadata of all 13 value types, arrays of every scalar type,
  nested arrays (gguf-py writes them: the outer element type is ARRAY and each inner array
  carries its own element type, so inner arrays of different types are possible), and tensors
  F32, F16 (3 elements, so the padding after it is 26 bytes), F16 with a leading torch 1-dim,
  BF16 and Q8_0 given as raw bytes.
- `align64.gguf` + `align64.json`: `general.alignment` = 64 (UINT32, via add_custom_alignment).

The JSON sidecar records what was written: every metadata value as a typed tree
{"type": NAME, "value": ...} (arrays hold typed trees), and every tensor's name, ggml type,
dims in ggml order, offset and data as hex.

gguf-py cannot write empty arrays or empty strings (it raises or silently skips them), so the
goldens have none; the Rust proptests cover those.
"""

import importlib.metadata
import json
import os

import numpy as np
import gguf
from gguf import GGUFValueType as T, GGMLQuantizationType as Q

HERE = os.path.dirname(os.path.abspath(__file__))


def typed(value, vtype, sub_type=None):
    """The sidecar's typed tree for a value written with (vtype, sub_type)."""
    if vtype == T.ARRAY:
        if sub_type is None:
            sub_type = T.get_type(value[0])
        return {"type": "ARRAY", "value": [typed(v, sub_type) for v in value]}
    return {"type": vtype.name, "value": value}


def main_basic(path, sidecar):
    w = gguf.GGUFWriter(path, arch="flux")
    kvs = [("general.architecture", "flux", T.STRING, None)]

    def kv(key, value, vtype, sub_type=None):
        w.add_key_value(key, value, vtype, sub_type=sub_type)
        kvs.append((key, value, vtype, sub_type))

    kv("general.quantization_version", 2, T.UINT32)
    kv("general.file_type", 1, T.UINT32)
    kv("test.u8", 200, T.UINT8)
    kv("test.i8", -100, T.INT8)
    kv("test.u16", 60000, T.UINT16)
    kv("test.i16", -30000, T.INT16)
    kv("test.u32", 4000000000, T.UINT32)
    kv("test.i32", -2000000000, T.INT32)
    kv("test.f32", 1.5, T.FLOAT32)
    kv("test.bool", True, T.BOOL)
    kv("test.string", "h\u00e9llo w\u00f6rld \u2713", T.STRING)
    kv("test.u64", 2**63 + 5, T.UINT64)
    kv("test.i64", -(2**62) - 7, T.INT64)
    kv("test.f64", 3.141592653589793, T.FLOAT64)
    kv("test.array.u8", [1, 2, 255], T.ARRAY, T.UINT8)
    kv("test.array.i8", [-128, 0, 127], T.ARRAY, T.INT8)
    kv("test.array.u16", [0, 65535], T.ARRAY, T.UINT16)
    kv("test.array.i16", [-32768, 32767], T.ARRAY, T.INT16)
    kv("test.array.u32", [7, 4294967295], T.ARRAY, T.UINT32)
    kv("test.array.i32", [1, -2, 3], T.ARRAY)  # ints default to INT32
    kv("test.array.f32", [0.5, -2.25, 1e-3], T.ARRAY)  # floats default to FLOAT32
    kv("test.array.bool", [True, False, True], T.ARRAY)
    kv("test.array.string", ["a", "bc", "d\u00e9f"], T.ARRAY)
    kv("test.array.u64", [0, 2**64 - 1], T.ARRAY, T.UINT64)
    kv("test.array.i64", [-(2**63), 2**63 - 1], T.ARRAY, T.INT64)
    kv("test.array.f64", [0.1, -1e300], T.ARRAY, T.FLOAT64)
    kv("test.array.nested", [[1, 2], [3]], T.ARRAY)
    kv("test.array.nested_mixed", [[1, 2], ["x", "yz"], [[True]]], T.ARRAY)
    kv("comfy.gguf.orig_shape.c.weight", [4, 16], T.ARRAY)

    rng = np.random.default_rng(1234)
    tensors = []

    def tensor(name, arr, raw_dtype=None):
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
        tensors.append((name, arr))

    tensor("a.weight", rng.standard_normal((2, 3)).astype(np.float32))
    tensor("tiny.bias", np.array([1.0, -2.0, 0.5], dtype=np.float16))
    tensor("b.weight", rng.standard_normal((1, 4, 8)).astype(np.float16))
    bf16 = (rng.standard_normal(8).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    tensor("d.bias", bf16.view(np.uint8).reshape(16), raw_dtype=Q.BF16)
    # Two rows of one Q8_0 block each: d (f16) then 32 int8 quants.
    rows = []
    for r in range(2):
        d = np.array([0.01 * (r + 1)], dtype=np.float16).view(np.uint8)
        qs = rng.integers(-127, 128, 32, dtype=np.int8).view(np.uint8)
        rows.append(np.concatenate([d, qs]))
    tensor("c.weight", np.stack(rows), raw_dtype=Q.Q8_0)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    describe(path, sidecar, kvs)


def main_align64(path, sidecar):
    w = gguf.GGUFWriter(path, arch="sd1")
    kvs = [("general.architecture", "sd1", T.STRING, None)]
    w.add_custom_alignment(64)
    kvs.append(("general.alignment", 64, T.UINT32, None))
    w.add_key_value("test.note", "aligned to 64", T.STRING)
    kvs.append(("test.note", "aligned to 64", T.STRING, None))
    w.add_tensor("x", np.arange(5, dtype=np.float32))
    w.add_tensor("y", np.arange(7, dtype=np.float16).reshape(7, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    describe(path, sidecar, kvs)


def describe(path, sidecar, kvs):
    """Writes the sidecar from what was passed to the writer and the tensor infos read back."""
    r = gguf.GGUFReader(path)
    out = {
        "gguf_py_version": importlib.metadata.version("gguf"),
        "file_len": os.path.getsize(path),
        "alignment": int(r.alignment),
        "data_offset": int(r.data_offset),
        "metadata": [{"key": k, **typed(v, t, s)} for k, v, t, s in kvs],
        "tensors": [
            {
                "name": t.name,
                "ggml_type": t.tensor_type.name,
                "dims": [int(d) for d in t.shape],
                "offset": int(t.data_offset - r.data_offset),
                "data_hex": bytes(t.data.tobytes()).hex(),
            }
            for t in r.tensors
        ],
    }
    with open(sidecar, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main_basic(os.path.join(HERE, "basic.gguf"), os.path.join(HERE, "basic.json"))
    main_align64(os.path.join(HERE, "align64.gguf"), os.path.join(HERE, "align64.json"))
