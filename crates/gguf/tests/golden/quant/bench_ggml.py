#!/usr/bin/env python3
"""Peer timing for `cargo run --release -p gguf --example quant_bench -- TYPE N_ROWS`:
ggml's reference quantizer through `ggml_quantize_chunk` (no imatrix), single-threaded
(the call itself never spawns threads), best of --runs (default 5), MB/s of f32 input, by
wall clock and by thread CPU time (the fair figure on a shared machine; quant_bench prints both).

    /work/pyref/bin/python crates/gguf/tests/golden/quant/bench_ggml.py TYPE N_ROWS [--lib PATH]

Input: the same xorshift32 "gauss * 0.02" values as quant_bench (row length 4096).
"""

import argparse
import ctypes
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_goldens import TYPES, Ggml, find_lib  # noqa: E402


def inputs(n):
    """Vectorised xorshift32 stream identical to quant_bench's scalar loop."""
    out = np.empty(n * 4, dtype=np.uint32)
    s = 0x12345678
    # A Python loop over 4n draws is slow for large n; generate in blocks with the same
    # recurrence (it is inherently sequential, so this is a plain loop, cached per n).
    for i in range(n * 4):
        s ^= (s << 13) & 0xFFFFFFFF
        s ^= s >> 17
        s ^= (s << 5) & 0xFFFFFFFF
        out[i] = s
    k = (out >> 8).astype(np.int64).reshape(n, 4).sum(axis=1)
    return (k - (1 << 25)).astype(np.float32) * np.float32(2.0**-24) * np.float32(0.02)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("type")
    ap.add_argument("rows", type=int)
    ap.add_argument("--row-len", type=int, default=4096)
    ap.add_argument("--lib", default=None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--random", action="store_true", help="numpy normal*0.02 input (faster setup)")
    a = ap.parse_args()
    path = a.lib or find_lib()
    g = Ggml(path)
    t = next(t for t in TYPES if t[0].lower() == a.type.lower())
    n = a.rows * a.row_len
    if a.random:
        x = (np.random.default_rng(1).standard_normal(n) * 0.02).astype(np.float32)
    else:
        x = inputs(n)
    x = x.reshape(a.rows, a.row_len)
    best = best_cpu = float("inf")
    for _ in range(max(1, a.runs)):
        t0, c0 = time.perf_counter(), time.thread_time()
        g.quantize(t[0], t[1], t[2], t[3], x)
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.thread_time() - c0)
    print(
        "ggml %s (%s) rows=%d row_len=%d: wall %.4f s, %.1f Mvalues/s, %.1f MB/s; "
        "thread CPU %.4f s, %.1f MB/s"
        % (t[0], g.kind, a.rows, a.row_len, best, n / best / 1e6, n * 4 / best / 1e6,
           best_cpu, n * 4 / best_cpu / 1e6)
    )


if __name__ == "__main__":
    main()
