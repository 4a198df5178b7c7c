#!/usr/bin/env python3
"""gguf-py reads every GGUF output of the fixture tests, and its dequantization equals ours.

Not run by CI (it needs pip `gguf` and `safetensors`). Usage:

    GGUF_CHECK_DIR=/tmp/gguf_check cargo test -p smart --test gguf_fixtures
    /work/pyref/bin/python crates/gguf/tests/golden/convert/check_outputs.py /tmp/gguf_check

The test writes, per fixture and target, `<name>.gguf` and `<name>.ours.safetensors` (convcache's
dequantization of every tensor, F32, stored shape). For each file this script:
- opens it with gguf-py's `GGUFReader` (which validates magic, version, offsets, alignment,
  duplicate names and that every quantized row is whole blocks);
- checks `general.architecture` is a STRING and every `comfy.gguf.orig_shape.*` an INT32 array
  whose product is the tensor's element count (what ComfyUI-GGUF's loader requires);
- dequantizes every tensor with `gguf.quants.dequantize` and compares the f32 bits with ours.
It prints one line per file and a summary, and exits non-zero on any difference.
"""

import glob
import os
import sys

import numpy as np


def main():
    import gguf
    from gguf import GGUFValueType
    from safetensors.numpy import load_file

    d = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("GGUF_CHECK_DIR")
    if not d:
        sys.exit("usage: check_outputs.py DIR")
    files = sorted(glob.glob(os.path.join(d, "*.gguf")))
    if not files:
        sys.exit(f"no .gguf files in {d}")
    bad, tensors, types = 0, 0, {}
    for path in files:
        problems = []
        r = gguf.GGUFReader(path)
        arch = r.fields.get("general.architecture")
        if arch is None or arch.types != [GGUFValueType.STRING]:
            problems.append("general.architecture is not a STRING")
        ours = load_file(path[: -len(".gguf")] + ".ours.safetensors")
        by_name = {t.name: t for t in r.tensors}
        for key, f in r.fields.items():
            if key.startswith("comfy.gguf.orig_shape."):
                name = key[len("comfy.gguf.orig_shape."):]
                if f.types != [GGUFValueType.ARRAY, GGUFValueType.INT32]:
                    problems.append(f"{key} is not an INT32 array")
                dims = [int(f.parts[i][0]) for i in f.data]
                if name not in by_name or int(np.prod(dims)) != int(by_name[name].n_elements):
                    problems.append(f"{key} does not match its tensor")
        for t in r.tensors:
            tensors += 1
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
            theirs = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
            mine = ours[t.name].reshape(-1)
            if theirs.shape != mine.shape or not np.array_equal(
                theirs.view(np.uint32), mine.view(np.uint32)
            ):
                diff = int(np.sum(theirs.view(np.uint32) != mine.view(np.uint32))) \
                    if theirs.shape == mine.shape else "shape"
                problems.append(f"{t.name} ({t.tensor_type.name}): {diff} values differ")
        status = "ok" if not problems else "FAIL " + "; ".join(problems[:5])
        bad += bool(problems)
        print(f"{os.path.basename(path)}: {len(r.tensors)} tensors {status}")
    print(f"{len(files)} files, {tensors} tensors, types {dict(sorted(types.items()))}: "
          f"{'all equal' if not bad else f'{bad} files differ'} (gguf-py {gguf.__file__})")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
