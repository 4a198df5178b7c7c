#!/usr/bin/env python3
"""Reads a GgufWriter output with gguf-py's GGUFReader and compares it with its description.

    GGUF_PY_CHECK_DIR=/tmp/gguf-check cargo test -p tensorfile --test gguf_container_golden
    /work/pyref/bin/python crates/tensorfile/tests/golden/gguf_container/check_with_gguf_py.py /tmp/gguf-check

`gguf_container_golden.rs` (test `writer_sample_round_trips_and_can_be_dumped`) writes
`sample.gguf` and `sample.json` there. Not run by CI (needs pip `gguf` and numpy).

gguf-py's ReaderField.contents() flattens nested arrays (a FIXME in gguf_reader.py), so nested
arrays are compared through the field's leaf values and its recorded type chain.
Floats are compared by bits (the JSON carries f32/f64 bit patterns).
"""

import importlib.metadata
import json
import struct
import sys

import numpy as np
import gguf
from gguf import GGUFValueType as T


def leaves(v):
    """(type name, value) of every leaf of a typed tree, depth first."""
    if v["type"] == "ARRAY":
        out = []
        for x in v["value"]:
            out += leaves(x)
        return out
    return [(v["type"], v["value"])]


def as_bits(type_name, x):
    if type_name == "FLOAT32":
        return struct.unpack("<I", struct.pack("<f", x))[0]
    if type_name == "FLOAT64":
        return struct.unpack("<Q", struct.pack("<d", x))[0]
    return x


def main(d):
    desc = json.load(open(f"{d}/sample.json"))
    r = gguf.GGUFReader(f"{d}/sample.gguf")
    fields = [f for f in r.fields.values() if not f.name.startswith("GGUF.")]
    assert [f.name for f in fields] == [m["key"] for m in desc["metadata"]], "key order"
    for f, m in zip(fields, desc["metadata"]):
        v = m["value"]
        assert f.types[0].name == v["type"], (f.name, f.types, v["type"])
        if v["type"] == "ARRAY":
            want = leaves(v)
            # The leaf types come from our description: gguf-py records only the first
            # element's type chain, but stores every leaf's bytes as its own part.
            assert len(f.data) == len(want), (f.name, len(f.data), want)
            for (t, w), i in zip(want, f.data):
                part = f.parts[i]
                g = bytes(part).decode() if t == "STRING" else part.tolist()[0]
                if t in ("FLOAT32", "FLOAT64"):
                    g = as_bits(t, g)
                assert g == w, (f.name, g, w)
        else:
            g = f.contents()
            if v["type"] in ("FLOAT32", "FLOAT64"):
                g = as_bits(v["type"], g)
            assert g == v["value"], (f.name, g, v["value"])
    assert len(r.tensors) == len(desc["tensors"])
    for t, w in zip(r.tensors, desc["tensors"]):
        assert t.name == w["name"]
        assert t.tensor_type.name == w["ggml_type"], (t.name, t.tensor_type.name)
        assert [int(x) for x in t.shape] == w["dims"], (t.name, t.shape, w["dims"])
        assert bytes(np.ascontiguousarray(t.data).tobytes()).hex() == w["data_hex"], t.name
    print(f"OK: {len(fields)} metadata keys and {len(r.tensors)} tensors match "
          f"(gguf-py {importlib.metadata.version('gguf')})")


if __name__ == "__main__":
    main(sys.argv[1])
