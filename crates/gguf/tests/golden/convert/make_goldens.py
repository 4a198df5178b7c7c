#!/usr/bin/env python3
"""Expected GGUF outputs for the fixture models, made with ComfyUI-GGUF's own tools and ggml.

Run with a Python that has torch, safetensors, tqdm, numpy, gguf (pip) and llama-cpp-python
(for ggml's quantizer), e.g.

    git clone https://github.com/city96/ComfyUI-GGUF /tmp/ComfyUI-GGUF   # tested at 795e451
    /work/pyref/bin/python crates/gguf/tests/golden/convert/make_goldens.py \
        [--comfy /tmp/ComfyUI-GGUF] [--lib path/to/libggml-base.so] [--keep DIR]

What it does, per fixture `fixtures/{arch}_{f32,f16,bf16,fp8}.safetensors` (and the checkpoint):
1. Runs ComfyUI-GGUF's real `tools/convert.py` (`convert_file`) on it: the F16/BF16 "base"
   GGUF. A 5-D tensor (wan) goes to `fix_5d_tensors_<arch>.safetensors` as convert.py does.
2. Re-types the base tensors as the patched llama-quantize (b3962 + `tools/lcpp.patch`) does,
   except where it would write a corrupt tensor (a Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 row that is not a
   whole number of 32-element blocks): such a tensor keeps its base type.
   The patch is C++ against an old llama.cpp, so its decisions are transcribed below
   (`quantize_allowed`, `img_tensor_get_type`, reading the patch), and the bytes come from ggml
   itself: the base tensor widened to f32, then `ggml_quantize_chunk` (no imatrix) from the
   `libggml-base.so` inside pip llama-cpp-python. Tensors not re-typed keep their base bytes.
3. Applies `tools/fix_5d_tensors.py`'s end state: every 5-D tensor as F32 right after the
   tensor whose name, with `.bias` replaced by `.weight`, is its name.
4. Writes the file with gguf-py's GGUFWriter (KVs: architecture, quantization_version,
   file_type, then the base's `comfy.gguf.orig_shape.*` in order; llama-quantize b3962 re-sets
   the first two in place) and records in `expected.json`, per output, the file's sha256 and
   size, the KV keys and each tensor's ggml type; tensor names and ggml dims in `layouts`.

Tensor order: convert.py's is its `load_file` dict order, which with current safetensors is the
order of the data in the file (`offset_keys`); llama-quantize b3962 then writes its loader's
`weights_map` order, i.e. names sorted bytewise.
   `--keep DIR` keeps the expected files themselves, to diff against a failing output.

The plain output (no quantization) is convert.py's own file (after the 5-D fix). convcache must
produce exactly these bytes when no provenance keys are added:
`crates/smart/tests/gguf_fixtures.rs` compares them.
"""

import argparse
import ctypes
import glob
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", "..", "..", ".."))
FIXTURES = os.path.join(REPO, "fixtures")

ARCHS = ["flux", "sd1", "sdxl", "sd3", "wan"]
DTYPES = ["f32", "f16", "bf16", "fp8"]
EXTRA = ["flux_checkpoint_bf16"]
# target name -> (llama file type id, default ggml type)
MIXES = {
    "Q4_K_M": (15, "Q4_K"),
    "Q8_0": (7, "Q8_0"),
    "Q4_0": (2, "Q4_0"),
    "Q3_K_M": (12, "Q3_K"),
}

# --- the patched llama-quantize (tools/lcpp.patch), transcribed ---

# `quantize &= name.find(x) == npos` (substring) and `quantize &= name != x` (exact).
NO_QUANT = {
    "flux": (["txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer."], []),
    "sd1": (
        ["class_embedding.", "time_embedding.", "add_embedding.", "time_embed.", "label_emb.",
         "conv_in.", "conv_out."],
        ["input_blocks.0.0.weight", "out.2.weight"],
    ),
    "sd3": (
        ["final_layer.", "time_text_embed.", "context_embedder.", "t_embedder.", "y_embedder.",
         "x_embedder."],
        ["proj_out.weight", "pos_embed"],
    ),
    "wan": (
        ["modulation.", "patch_embedding.", "text_embedding.", "time_projection.",
         "time_embedding.", "img_emb.", "head."],
        [],
    ),
}
NO_QUANT["sdxl"] = NO_QUANT["sd1"]


def ggml_n_dims(ne):
    n = len(ne)
    while n > 1 and ne[n - 1] == 1:
        n -= 1
    return max(n, 1)


def quantize_allowed(arch, name, ne):
    q = name.endswith("weight")  # name.rfind("weight") == name.size() - 6
    q = q and ggml_n_dims(ne) >= 2
    q = q and "_norm.weight" not in name
    subs, exact = NO_QUANT[arch]
    q = q and not any(s in name for s in subs) and name not in exact
    q = q and ggml_n_dims(ne) == 2  # image models: exactly 2-D
    return q


def img_tensor_get_type(state, ftype, new_type, name, ne0):
    v = ["attn_v.weight", ".to_v.weight", ".v.weight", ".attn.w1v.weight", ".attn.w2v.weight",
         "_attn.v_proj.weight"]
    qkv = ["attn_qkv.weight", "attn.qkv.weight", "attention.qkv.weight"]
    ffn = ["ffn_down", ".ffn.2.weight", ".ff.net.2.weight", ".mlp.layer2.weight",
           ".adaln_modulation_mlp.2.weight", ".feed_forward.w2.weight"]
    if any(p in name for p in v):
        if ftype == "Q2_K":
            new_type = "Q3_K"
        elif ftype == "Q3_K_M":
            new_type = "Q5_K" if state["wv"] < 2 else "Q4_K"
        elif ftype == "Q3_K_L":
            new_type = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M"):
            new_type = "Q6_K"
        elif ftype == "Q4_K_S" and state["wv"] < 4:
            new_type = "Q5_K"
        state["wv"] += 1
    elif any(p in name for p in qkv):
        if ftype in ("Q3_K_M", "Q3_K_L"):
            new_type = "Q4_K"
        elif ftype == "Q4_K_M":
            new_type = "Q5_K"
        elif ftype == "Q5_K_M":
            new_type = "Q6_K"
    elif any(p in name for p in ffn) or ("experts." in name and ".w2.weight" in name):
        new_type = {
            "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "Q4_K_S": "Q5_K", "Q4_K_M": "Q6_K",
            "Q5_K_M": "Q6_K", "Q4_0": "Q4_1", "Q5_0": "Q5_1",
        }.get(ftype, new_type)
    if new_type in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K") and ne0 % 256 != 0:
        new_type = "F16"
    return new_type


# --- ggml through ctypes ---

class Ggml:
    def __init__(self, path):
        if path is None:
            hits = []
            for p in sys.path:
                hits += glob.glob(os.path.join(p, "llama_cpp", "**", "libggml-base.so*"),
                                  recursive=True)
            if not hits:
                sys.exit("libggml-base.so not found: pip install llama-cpp-python or pass --lib")
            path = hits[0]
        self.path = path
        self.lib = ctypes.CDLL(path)
        self.chunk = self.lib.ggml_quantize_chunk
        self.chunk.restype = ctypes.c_size_t
        self.chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                               ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

    def quantize(self, type_name, values, n_per_row):
        import gguf
        t = gguf.GGMLQuantizationType[type_name]
        bs, ts = gguf.GGML_QUANT_SIZES[t]
        x = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        rows = x.size // n_per_row
        out = ctypes.create_string_buffer(x.size // bs * ts)
        got = self.chunk(int(t), x.ctypes.data, out, 0, rows, n_per_row, None)
        assert got == x.size // bs * ts, (type_name, got)
        return out.raw


def sha(b):
    return hashlib.sha256(b).hexdigest()


def load_convert(comfy):
    path = os.path.join(comfy, "tools", "convert.py")
    spec = importlib.util.spec_from_file_location("comfy_gguf_convert", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Tensor:
    def __init__(self, name, ttype, ne, data):
        self.name, self.type, self.ne, self.data = name, ttype, list(ne), data


def read_base(path):
    import gguf
    r = gguf.GGUFReader(path)
    kv = []
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue
        kv.append(f)
    tensors = [Tensor(t.name, t.tensor_type.name, [int(d) for d in t.shape],
                      bytes(t.data.tobytes())) for t in r.tensors]
    return r, kv, tensors


def fix_5d(tensors, sd5d):
    out, added = [], set()
    for t in tensors:
        out.append(t)
        key = t.name.replace(".bias", ".weight")
        if key in sd5d:
            out.append(sd5d[key])
            added.add(key)
    out += [t for k, t in sd5d.items() if k not in added]
    return out


def write(path, arch, ftype_id, orig_shapes, tensors):
    import gguf
    w = gguf.GGUFWriter(path=None, arch=arch)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(ftype_id)
    for k, dims in orig_shapes:
        w.add_array(k, dims)
    for t in tensors:
        qt = gguf.GGMLQuantizationType[t.type]
        bs, ts = gguf.GGML_QUANT_SIZES[qt]
        # gguf-py takes raw uint8 data with its byte shape (the row in bytes).
        byte_shape = list(reversed(t.ne))
        byte_shape[-1] = t.ne[0] // bs * ts
        arr = np.frombuffer(t.data, dtype=np.uint8)
        w.add_tensor(t.name, arr, raw_shape=byte_shape, raw_dtype=qt)
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def summary(path, fixture, target):
    import gguf
    r = gguf.GGUFReader(path)
    with open(path, "rb") as f:
        whole = f.read()
    return {
        "fixture": fixture,
        "target": target,
        "sha256": sha(whole),
        "bytes": len(whole),
        "kv": [k for k in r.fields if not k.startswith("GGUF.")],
        "tensors": [
            [t.name, t.tensor_type.name, [int(d) for d in t.shape], sha(t.data.tobytes())[:16]]
            for t in r.tensors
        ],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", default="/tmp/ComfyUI-GGUF")
    ap.add_argument("--lib")
    ap.add_argument("--keep", help="also keep the expected .gguf files in this dir")
    args = ap.parse_args()

    import gguf
    from safetensors.numpy import load_file

    conv = load_convert(args.comfy)
    ggml = Ggml(args.lib)
    names = [f"{a}_{d}" for a in ARCHS for d in DTYPES] + EXTRA
    results = []
    work = tempfile.mkdtemp(prefix="convcache-gguf-golden-")
    cwd = os.getcwd()
    try:
        for stem in names:
            src = os.path.join(FIXTURES, stem + ".safetensors")
            run = os.path.join(work, stem)
            os.makedirs(run)
            os.chdir(run)  # convert.py writes the 5-D fix file into the cwd
            base_path = os.path.join(run, "base.gguf")
            _, model_arch = conv.convert_file(src, base_path, interact=False, overwrite=True)
            arch = model_arch.arch
            os.chdir(cwd)
            reader, _, base = read_base(base_path)
            ft_field = reader.get_field("general.file_type")
            base_ft = int(ft_field.parts[ft_field.data[-1]][0])
            orig = []
            for k, f in reader.fields.items():
                if k.startswith("comfy.gguf.orig_shape."):
                    orig.append((k, [int(f.parts[i][0]) for i in f.data]))
            fix_path = os.path.join(run, f"fix_5d_tensors_{arch}.safetensors")
            sd5d = {}
            if os.path.exists(fix_path):
                for k, v in load_file(fix_path).items():
                    data = gguf.quants.quantize(v.astype(np.float32), gguf.GGMLQuantizationType.F32)
                    sd5d[k] = Tensor(k, "F32", list(reversed(v.shape)), data.tobytes())

            outputs = {"F16" if base_ft == 1 else "BF16": (base_ft, base)}
            for mix, (ft_id, default) in MIXES.items():
                state = {"wv": 0}
                out = []
                # llama-quantize b3962 walks its loader's weights_map, a std::map ordered by
                # weight_name_comparer: plain name order for names without `blk.N.`.
                for t in sorted(base, key=lambda t: t.name.encode()):
                    new_type = t.type
                    if quantize_allowed(arch, t.name, t.ne):
                        new_type = img_tensor_get_type(state, mix, default, t.name, t.ne[0])
                        bs = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[new_type]][0]
                        if t.ne[0] % bs != 0:
                            # The patch has no fallback for 32-element blocks: llama-quantize
                            # would write rows of partial blocks that no reader accepts. The
                            # tensor keeps its base type instead (issue 4's rule).
                            new_type = t.type
                    if new_type == t.type:
                        out.append(t)
                        continue
                    values = gguf.quants.dequantize(
                        np.frombuffer(t.data, dtype=np.uint8),
                        gguf.GGMLQuantizationType[t.type],
                    ).astype(np.float32)
                    data = ggml.quantize(new_type, values, t.ne[0])
                    out.append(Tensor(t.name, new_type, t.ne, data))
                outputs[mix] = (ft_id, out)

            for target, (ft_id, tensors) in outputs.items():
                final = fix_5d(tensors, sd5d)
                path = os.path.join(run, f"{target}.gguf")
                write(path, arch, ft_id, orig, final)
                results.append(summary(path, stem + ".safetensors", target))
                if args.keep:
                    os.makedirs(args.keep, exist_ok=True)
                    shutil.copy(path, os.path.join(args.keep, f"{stem}_{target}.gguf"))
            print(stem, arch, "ok", file=sys.stderr)
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)

    # Compact form: names and dims once per fixture (every output of a fixture has the same
    # tensors in the same order), types and short data hashes per output.
    layouts, outputs = [], []
    for r in results:
        layout = {"names": [t[0] for t in r["tensors"]], "dims": [t[2] for t in r["tensors"]]}
        if layout not in layouts:
            layouts.append(layout)
        outputs.append({
            "fixture": r["fixture"],
            "target": r["target"],
            "layout": layouts.index(layout),
            "sha256": r["sha256"],
            "bytes": r["bytes"],
            "kv": r["kv"],
            "types": ",".join(t[1] for t in r["tensors"]),
        })
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump({
            "made_by": "crates/gguf/tests/golden/convert/make_goldens.py (ComfyUI-GGUF 795e451 "
                       "tools/convert.py, lcpp.patch rules, ggml "
                       + os.path.basename(ggml.path) + ", gguf-py GGUFWriter)",
            "layouts": layouts,
            "outputs": outputs,
        }, f, indent=0, separators=(",", ":"))
        f.write("\n")
    print("wrote", len(results), "outputs", file=sys.stderr)


if __name__ == "__main__":
    main()
