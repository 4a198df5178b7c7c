#!/usr/bin/env python3
"""Make the quantization goldens in this directory with ggml itself.

Run with a Python that has numpy (and, for the second opinion, gguf==0.19.0), e.g.

    /work/pyref/bin/python crates/gguf/tests/golden/quant/make_goldens.py [--lib PATH]

The library is ggml's `libggml-base.so` as shipped inside pip `llama-cpp-python`
(found automatically under the running interpreter's site-packages, or pass --lib). It is
called through ctypes: `ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, NULL)`
(no importance matrix, as llama-quantize without --imatrix) and
`ggml_get_type_traits(type)->to_float`. ggml-base is built without arch flags on x86-64, so no
FMA contraction happens; the script checks the reference-note vector (ggml-quants.md §10)
first-bytes to catch a contracted build.

Fallback when no pip build is available: compile ggml's src/ggml-quants.c standalone with
`gcc -O3 -std=gnu11 -fPIC -shared -DNDEBUG` (x86-64 baseline, plus a stub for ggml_row_size)
and pass it as --lib; the script then calls `quantize_q*` / `dequantize_row_*` directly, which
is what ggml_quantize_chunk and to_float call.

Outputs (all little-endian):
  <case>.input.f32  raw f32 input, rows x n_per_row, for the small hand-built cases
  <case>.quant.bin  the quantized bytes of every type, concatenated in manifest order
  manifest.json     per case and type: offset/length into .quant.bin (small cases), and
                    FNV-1a-64 of the quantized bytes and of the dequantized f32 bytes.
The large cases ("sweep", "note_vector") are not stored: tests regenerate them with the
xorshift32 generator documented in `gen_sweep` / `gen_note_vector` and compare hashes.
"""

import argparse
import ctypes
import glob
import json
import os
import struct
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# (name, ggml id, block size, bytes per block) in convcache's GgmlType::ALL order.
TYPES = [
    ("F32", 0, 1, 4),
    ("F16", 1, 1, 2),
    ("Q4_0", 2, 32, 18),
    ("Q4_1", 3, 32, 20),
    ("Q5_0", 6, 32, 22),
    ("Q5_1", 7, 32, 24),
    ("Q8_0", 8, 32, 34),
    ("Q2_K", 10, 256, 84),
    ("Q3_K", 11, 256, 110),
    ("Q4_K", 12, 256, 144),
    ("Q5_K", 13, 256, 176),
    ("Q6_K", 14, 256, 210),
    ("BF16", 30, 1, 2),
]


def fnv1a64(b: bytes) -> str:
    """FNV-1a 64 over bytes (vectorised over 8 lanes would change the value; keep it plain)."""
    h = 0xCBF29CE484222325
    for c in b:
        h ^= c
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h


class Xorshift32:
    """xorshift32 (13, 17, 5), the generator the Rust tests reimplement."""

    def __init__(self, seed):
        self.s = seed & 0xFFFFFFFF

    def next(self):
        s = self.s
        s ^= (s << 13) & 0xFFFFFFFF
        s ^= s >> 17
        s ^= (s << 5) & 0xFFFFFFFF
        self.s = s
        return s

    def gauss(self):
        """Sum of four 24-bit draws, centred, scaled by 2^-24: roughly N(0, 0.58), as f32."""
        k = sum(self.next() >> 8 for _ in range(4))
        return np.float32(k - (1 << 25)) * np.float32(2.0**-24)


def gen_note_vector():
    """ggml-quants.md §10: 16 x 4096; rows 0-13 g*0.02, row 14 zero, row 15 g with 3.0 at i=7."""
    r = Xorshift32(0x12345678)
    x = np.zeros((16, 4096), dtype=np.float32)
    for row in range(16):
        for i in range(4096):
            g = r.gauss()
            if row == 14:
                v = np.float32(0.0)
            elif row == 15:
                v = np.float32(3.0) if i == 7 else g
            else:
                v = g * np.float32(0.02)
            x[row, i] = v
    return x


SWEEP_SCALES = [np.float32(s) for s in (0.02, 1.0, 1e-3, 300.0, 3e-6, 6e4)]


def gen_sweep():
    """512 rows x 256, seed 0xC0FFEE: row r is gauss * SWEEP_SCALES[r % 6]; every row with
    r % 5 == 0 also gets value (draw % 256) set to gauss * scale * 64 (an outlier); every row with
    r % 7 == 3 has its 16-value sub-block (draw % 16) zeroed. Draws happen in exactly this order:
    256 gauss values, then the outlier draw + gauss if any, then the zero draw if any."""
    r = Xorshift32(0xC0FFEE)
    x = np.zeros((512, 256), dtype=np.float32)
    for row in range(512):
        sc = SWEEP_SCALES[row % 6]
        for i in range(256):
            x[row, i] = r.gauss() * sc
        if row % 5 == 0:
            pos = r.next() % 256
            x[row, pos] = r.gauss() * sc * np.float32(64.0)
        if row % 7 == 3:
            sb = r.next() % 16
            x[row, 16 * sb : 16 * sb + 16] = 0.0
    return x


def small_cases():
    """Hand-built special cases, 256-multiples wide, stored with the goldens."""
    rng = np.random.default_rng(20261127)
    cases = {}
    n = 256

    w = rng.standard_normal((6, 2 * n)).astype(np.float32)
    w *= np.array([0.02, 0.5, 1e-3, 10.0, 0.02, 0.1], dtype=np.float32)[:, None]
    w[4] = np.abs(w[4])  # all positive: min clamps to 0
    w[5] = -np.abs(w[5])  # all negative
    cases["weights"] = w

    z = np.zeros((4, n), dtype=np.float32)
    z[1, 3] = 1.0  # one value in an otherwise zero block
    z[2, :] = rng.standard_normal(n).astype(np.float32) * np.float32(0.05)
    z[2, 0:32] = 0.0  # zero sub-blocks next to live ones
    z[2, 128:144] = 0.0
    z[3, :] = -0.0
    cases["zeros"] = z

    o = (rng.standard_normal((6, n)) * 0.01).astype(np.float32)
    o[0, 17] = 1e4
    o[1, 200] = -1e4
    o[2, 0] = 3.0e4
    o[3, 255] = 60000.0
    o[4, 40] = 1e6  # scale beyond f16 range
    o[5, 5] = -65504.0
    o[5, 6] = 65504.0
    cases["outlier"] = o

    s = np.zeros((5, n), dtype=np.float32)
    tiny = np.float32(1.4e-45)
    s[0] = (rng.integers(-1000, 1000, n).astype(np.float32)) * tiny  # all subnormal
    s[1] = (rng.standard_normal(n) * 1e-39).astype(np.float32)
    s[2] = (rng.standard_normal(n) * 1e-20).astype(np.float32)  # below GROUP_MAX_EPS^2
    s[3] = (rng.standard_normal(n) * 1e-16).astype(np.float32)
    s[4] = (rng.standard_normal(n) * 0.02).astype(np.float32)
    s[4, ::3] = (rng.standard_normal(len(s[4, ::3])) * 1e-40).astype(np.float32)
    cases["subnormal"] = s

    f = np.zeros((6, n), dtype=np.float32)
    f[0] = np.float32(65504.0) * np.sign(rng.standard_normal(n)).astype(np.float32)
    f[1] = (rng.uniform(-1, 1, n) * 70000.0).astype(np.float32)  # past f16 max
    f[2] = (rng.uniform(-1, 1, n) * 6e-8).astype(np.float32)  # f16 subnormal range
    f[3] = (rng.uniform(-1, 1, n) * 6.1e-5).astype(np.float32)  # f16 normal/subnormal edge
    f[4] = (rng.uniform(-1, 1, n) * 1e-7 * 63 * 15).astype(np.float32)
    f[5] = np.float32(65520.0)  # rounds to f16 inf
    cases["f16_extremes"] = f

    c = np.zeros((6, n), dtype=np.float32)
    c[0] = 1.0
    c[1] = -1.0
    c[2] = 0.5
    c[3] = (rng.integers(-8, 8, n)).astype(np.float32)  # exact ties for several scales
    c[4] = (rng.integers(-64, 64, n) * 0.5).astype(np.float32)
    c[5] = np.float32(-3.0e-3)
    cases["constant_and_ties"] = c

    return cases


def pip_version(dist):
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001 - informational only
        return None


def find_lib():
    hits = []
    for p in sys.path:
        hits += glob.glob(os.path.join(p, "llama_cpp", "**", "libggml-base.so*"), recursive=True)
    return hits[0] if hits else None


class Ggml:
    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        self.path = path
        self.chunk = getattr(self.lib, "ggml_quantize_chunk", None)
        if self.chunk is not None:
            self.kind = "ggml_quantize_chunk"
            self.chunk.restype = ctypes.c_size_t
            self.chunk.argtypes = [
                ctypes.c_int,
                ctypes.c_void_p,
                ctypes.c_void_p,
                ctypes.c_int64,
                ctypes.c_int64,
                ctypes.c_int64,
                ctypes.c_void_p,
            ]

            class Traits(ctypes.Structure):
                _fields_ = [
                    ("type_name", ctypes.c_char_p),
                    ("blck_size", ctypes.c_int64),
                    ("blck_size_interleave", ctypes.c_int64),
                    ("type_size", ctypes.c_size_t),
                    ("is_quantized", ctypes.c_bool),
                    ("to_float", ctypes.c_void_p),
                    ("from_float_ref", ctypes.c_void_p),
                ]

            self.lib.ggml_get_type_traits.restype = ctypes.POINTER(Traits)
            self.lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
            self.to_float = {}
            proto = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
            for name, tid, bs, ts in TYPES:
                t = self.lib.ggml_get_type_traits(tid).contents
                assert t.type_name.decode().upper() == name.upper(), (t.type_name, name)
                assert (t.blck_size, t.type_size) == (bs, ts), name
                self.to_float[tid] = proto(t.to_float) if t.to_float else None
        else:
            self.kind = "standalone ggml-quants.c"

    def quantize(self, name, tid, bs, ts, x):
        rows, n_per_row = x.shape
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = ctypes.create_string_buffer(x.size // bs * ts)
        if self.chunk is not None:
            got = self.chunk(tid, x.ctypes.data, out, 0, rows, n_per_row, None)
            assert got == len(out.raw), (name, got)
        elif name == "F32":
            return x.tobytes()
        elif name == "F16":
            # Standalone fallback only (ggml.c not built): numpy's RNE cast equals ggml's
            # conversion except for NaN, which ggml maps to 0x7E00 | sign.
            h = x.astype(np.float16).view(np.uint16).copy()
            nan = np.isnan(x)
            h[nan] = 0x7E00 | ((x.view(np.uint32)[nan] >> 16) & 0x8000).astype(np.uint16)
            return h.tobytes()
        elif name == "BF16":
            u = x.view(np.uint32).astype(np.uint64)
            nan = (u & 0x7FFFFFFF) > 0x7F800000
            r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
            r[nan] = (u[nan] >> 16) | 64
            return r.astype(np.uint16).tobytes()
        else:
            f = getattr(self.lib, "quantize_" + name.lower().replace("_k", "_K"))
            f.restype = ctypes.c_size_t
            f(ctypes.c_void_p(x.ctypes.data), out, ctypes.c_int64(rows), ctypes.c_int64(n_per_row), None)
        return out.raw

    def dequantize(self, name, tid, data, n):
        y = np.zeros(n, dtype=np.float32)
        buf = ctypes.create_string_buffer(data, len(data))
        if self.chunk is not None:
            if name == "F32":
                return np.frombuffer(data, dtype=np.float32).copy()
            self.to_float[tid](ctypes.cast(buf, ctypes.c_void_p), y.ctypes.data, n)
        elif name == "F32":
            return np.frombuffer(data, dtype=np.float32).copy()
        elif name == "F16":
            return np.frombuffer(data, dtype=np.float16).astype(np.float32)
        elif name == "BF16":
            return (np.frombuffer(data, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            f = getattr(self.lib, "dequantize_row_" + name.lower().replace("_k", "_K"))
            f(buf, ctypes.c_void_p(y.ctypes.data), ctypes.c_int64(n))
        return y


def gguf_py_second_opinion(name, x, qbytes, deq):
    """gguf-py 0.19's numpy quantizers (legacy + float types) and dequantizers (all types)."""
    try:
        import gguf
        from gguf import quants
    except ImportError:
        return "gguf-py not installed"
    qt = getattr(gguf.GGMLQuantizationType, name)
    notes = []
    if name not in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        try:
            ours = quants.quantize(x, qt).tobytes()
            notes.append("quantize " + ("==" if ours == qbytes else "!="))
        except NotImplementedError:
            pass
    raw = np.frombuffer(qbytes, dtype=np.uint8).reshape(x.shape[0], -1)
    d = quants.dequantize(raw, qt).astype(np.float32).reshape(-1)
    same = d.tobytes() == deq.tobytes()
    if not same:
        # NaN payloads may differ; compare the rest bit for bit.
        a, b = d.view(np.uint32), deq.view(np.uint32)
        same = bool(np.all((a == b) | (np.isnan(d) & np.isnan(deq))))
        notes.append("dequantize " + ("== (NaN payloads aside)" if same else "!="))
    else:
        notes.append("dequantize ==")
    return ", ".join(notes)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default=None)
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()
    path = args.lib or find_lib()
    if not path:
        raise SystemExit("libggml-base.so not found; pip install llama-cpp-python or pass --lib")
    g = Ggml(path)
    print("using", path, "via", g.kind)

    manifest = {
        "generator": "make_goldens.py",
        "library": os.path.basename(path),
        "entry": g.kind,
        "llama_cpp_python": pip_version("llama_cpp_python"),
        "gguf_py": pip_version("gguf"),
        "types": [t[0] for t in TYPES],
        "cases": [],
    }
    mismatch_second_opinion = []

    def run_case(name, x, store):
        entry = {"name": name, "rows": int(x.shape[0]), "n_per_row": int(x.shape[1])}
        entry["input_fnv"] = fnv1a64(x.tobytes())
        outs = {}
        blob = b""
        for tname, tid, bs, ts in TYPES:
            q = g.quantize(tname, tid, bs, ts, x)
            deq = g.dequantize(tname, tid, q, x.size)
            rec = {"quant_fnv": fnv1a64(q), "dequant_fnv": fnv1a64(deq.tobytes()), "len": len(q)}
            if store:
                rec["offset"] = len(blob)
                blob += q
            op = gguf_py_second_opinion(tname, x, q, deq)
            rec["gguf_py"] = op
            if "!=" in op:
                mismatch_second_opinion.append((name, tname, op))
            outs[tname] = rec
        entry["outputs"] = outs
        if store:
            entry["input"] = name + ".input.f32"
            entry["quant"] = name + ".quant.bin"
            with open(os.path.join(args.out, entry["input"]), "wb") as f:
                f.write(x.astype("<f4").tobytes())
            with open(os.path.join(args.out, entry["quant"]), "wb") as f:
                f.write(blob)
        manifest["cases"].append(entry)
        print(name, x.shape, "done")

    for name, x in small_cases().items():
        run_case(name, x, True)
    run_case("sweep", gen_sweep(), False)
    note = gen_note_vector()
    run_case("note_vector", note, False)

    # The note's first-8-byte values tell a plain x86-64 build from an FMA-contracted one.
    first8 = {
        "Q4_0": "e99a8c7949a46388",
        "Q2_K": "cf7afd9aef9bedb9",
        "Q3_K": "bb5335166697ac32",
        "Q4_K": "d403dd0ffef7ffbb",
        "Q5_K": "ee010110fbb7ffb7",
        "Q6_K": "8e82d5704bfe216a",
    }
    for tname, tid, bs, ts in TYPES:
        if tname in first8:
            got = g.quantize(tname, tid, bs, ts, note)[:8].hex()
            assert got == first8[tname], (tname, got, "FMA-contracted ggml build?")

    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    if mismatch_second_opinion:
        print("gguf-py disagrees with ggml:", mismatch_second_opinion)
    print("ok")


if __name__ == "__main__":
    main()
