"""llama.cpp's own llama-quantize on two tiny T5 encoders: the per-tensor types and bytes
convcache's text-encoder GGUFs must equal.

The T5 / umt5 GGUFs ComfyUI users download were made with stock llama.cpp (convert_hf_to_gguf.py
then llama-quantize), whose llama_tensor_get_type (src/llama-quant.cpp) picks each tensor's
type. This script runs that quantizer (llama-cpp-python's llama_model_quantize, default params,
one thread) on the committed F16 inputs and records, per input and file type, every output
tensor (in file order) as [name, ggml type name, first 16 hex digits of the sha256 of its data]
in expected.json. The Rust
test crates/gguf/tests/t5_llamacpp.rs converts the same inputs with convcache and compares.

Inputs (committed beside this script, made by convcache itself so they also show llama.cpp
reads convcache's T5 GGUFs, hyperparameters included):
  t5_d256_F16.gguf  T5 v1.1 layout, F32 source: d_model 256 (K-quant rows), 12 blocks (so
                    llama-quantize's name order enc.blk.0, 1, 10, 11, 2, ... drives its layer
                    counters), 1 head of 32, d_ff 32: attn_o and ffn_down rows of 32 take the
                    K-quant fallbacks. 1-D norms and the small attn_rel_b stay F32.
  umt5_d160_F16.gguf umt5 layout (attn_rel_b in every block), F16 source (norms stored F32,
                    as llama.cpp's converter stores them): d_model 160 (not a multiple of 256:
                    token_embd's Q8_0 rule and every K-quant fallback), 2 blocks, 2 heads of 16,
                    d_ff 64.

Run from the repository root (the venv has llama-cpp-python, gguf, numpy, safetensors):
    cargo build -p cli
    /work/bench-venv/bin/python crates/gguf/tests/golden/t5_llamacpp/make_golden.py --inputs
    /work/bench-venv/bin/python crates/gguf/tests/golden/t5_llamacpp/make_golden.py
`--inputs` remakes the two F16 inputs (random weights from a fixed seed, converted with
`convcache convert --to gguf_f16`); without it only expected.json is remade.
"""
import ctypes
import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import gguf
import llama_cpp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "../../../../.."))
CLI = os.path.join(ROOT, "target/debug/convcache")

# name -> (d_model, d_ff, n_head, d_kv, blocks, vocab, umt5, dtype, seed)
INPUTS = {
    "t5_d256": (256, 32, 1, 32, 12, 32, False, np.float32, 1),
    "umt5_d160": (160, 64, 2, 16, 2, 32, True, np.float16, 2),
}

# Every file type convcache offers that llama-quantize makes (convcache's FileType names).
FILE_TYPES = [
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
]


def make_safetensors(path, d_model, d_ff, n_head, d_kv, blocks, vocab, umt5, dtype, seed):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(dtype)

    inner = n_head * d_kv
    t = {"shared.weight": w(vocab, d_model)}
    for b in range(blocks):
        p = f"encoder.block.{b}"
        for m in "qkv":
            t[f"{p}.layer.0.SelfAttention.{m}.weight"] = w(inner, d_model)
        t[f"{p}.layer.0.SelfAttention.o.weight"] = w(d_model, inner)
        if umt5 or b == 0:
            t[f"{p}.layer.0.SelfAttention.relative_attention_bias.weight"] = w(32, n_head)
        t[f"{p}.layer.0.layer_norm.weight"] = (1 + w(d_model)).astype(dtype)
        t[f"{p}.layer.1.DenseReluDense.wi_0.weight"] = w(d_ff, d_model)
        t[f"{p}.layer.1.DenseReluDense.wi_1.weight"] = w(d_ff, d_model)
        t[f"{p}.layer.1.DenseReluDense.wo.weight"] = w(d_model, d_ff)
        t[f"{p}.layer.1.layer_norm.weight"] = (1 + w(d_model)).astype(dtype)
    t["encoder.final_layer_norm.weight"] = (1 + w(d_model)).astype(dtype)
    save_file(t, path)


def make_inputs():
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in INPUTS.items():
            src = os.path.join(tmp, name + ".safetensors")
            make_safetensors(src, *spec)
            models = os.path.join(tmp, "models")
            subprocess.run(
                [CLI, "--models-dir", models, "-q", "convert", src, "--to", "gguf_f16"],
                check=True,
            )
            (out,) = glob.glob(os.path.join(models, "text_encoders/gguf", name + "_F16.gguf"))
            strip_provenance(out, os.path.join(HERE, name + "_F16.gguf"))


def strip_provenance(src, dst):
    """Copies a GGUF without convcache's provenance keys (paths and times of this machine)."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name.startswith("convcache.") or f.name == "general.architecture":
            continue
        w.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_shape=list(reversed([int(d) for d in t.shape])), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize(src, dst, file_type):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + file_type)
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        sys.exit(f"llama_model_quantize {src} {file_type}: {rc}")


def listing(path):
    r = gguf.GGUFReader(path)
    return [
        [t.name, t.tensor_type.name, hashlib.sha256(t.data.tobytes()).hexdigest()[:16]]
        for t in r.tensors
    ]


def main():
    if "--inputs" in sys.argv:
        make_inputs()
    expected = {"llama_cpp_python": llama_cpp.__version__, "inputs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in INPUTS:
            src = os.path.join(HERE, name + "_F16.gguf")
            outs = {}
            for ft in FILE_TYPES:
                dst = os.path.join(tmp, f"{name}_{ft}.gguf")
                quantize(src, dst, ft)
                outs[ft] = listing(dst)
            expected["inputs"][name + "_F16.gguf"] = outs
    # One tensor per line: small diffs when a rule changes.
    lines = ["{", f' "llama_cpp_python": {json.dumps(expected["llama_cpp_python"])},', ' "inputs": {']
    inputs = list(expected["inputs"].items())
    for i, (name, outs) in enumerate(inputs):
        lines.append(f"  {json.dumps(name)}: {{")
        fts = list(outs.items())
        for j, (ft, tensors) in enumerate(fts):
            lines.append(f"   {json.dumps(ft)}: [")
            lines += [f"    {json.dumps(t)}" + ("," if k + 1 < len(tensors) else "") for k, t in enumerate(tensors)]
            lines.append("   ]" + ("," if j + 1 < len(fts) else ""))
        lines.append("  }" + ("," if i + 1 < len(inputs) else ""))
    lines += [" }", "}"]
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == expected
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
