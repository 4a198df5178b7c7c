"""Cross-checks the generated fixtures with the reference Python tools.

usage: python xtask/scripts/verify_fixtures.py [fixtures]
(a Python with torch, safetensors, gguf and numpy, e.g. the bench venv target/bench-venv)

Checks that every safetensors fixture loads in safetensors.torch, that ComfyUI-GGUF's
convert.py detection rules (reproduced below) find the intended architecture, that the
f16/bf16/fp8 variants are bit-identical to torch's `.to(dtype)` of the f32 file, that the
checkpoint-layout file is the prefixed bf16 file, and that flux_f16.gguf reads back in gguf-py
with the tensors numpy's casts of flux_f32 give. Exits non-zero on the first mismatch.
"""

import glob
import os
import sys

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

# convert.py's detection tuples (arch matches when all keys of any one tuple are present),
# in its order.
ARCHS = [
    ("flux", [("transformer_blocks.0.attn.norm_added_k.weight",),
              ("double_blocks.0.img_attn.proj.weight",)]),
    ("sd3", [("transformer_blocks.0.attn.add_q_proj.weight",),
             ("joint_blocks.0.x_block.attn.qkv.weight",)]),
    ("wan", [("blocks.0.self_attn.norm_q.weight", "text_embedding.2.weight", "head.modulation")]),
    ("sdxl", [("down_blocks.0.downsamplers.0.conv.weight", "add_embedding.linear_1.weight"),
              ("input_blocks.3.0.op.weight", "input_blocks.6.0.op.weight",
               "output_blocks.2.2.conv.weight", "output_blocks.5.2.conv.weight"),
              ("label_emb.0.0.weight",)]),
    ("sd1", [("down_blocks.0.downsamplers.0.conv.weight",),
             ("input_blocks.3.0.op.weight", "input_blocks.6.0.op.weight",
              "input_blocks.9.0.op.weight", "output_blocks.2.1.conv.weight",
              "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight")]),
]
PREFIX = "model.diffusion_model."


def detect(keys):
    keys = set(keys)
    if any(k.startswith(PREFIX) for k in keys):
        keys = {k.replace(PREFIX, "") for k in keys if PREFIX in k}
    for arch, tuples in ARCHS:
        if any(all(k in keys for k in t) for t in tuples):
            return arch
    return None


def same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else "fixtures"
    for path in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        base = os.path.basename(path)
        sd = load_file(path)
        arch = detect(sd.keys())
        expected = base.split("_")[0]
        assert arch == expected, (base, arch)
        for suffix in ("_f16", "_bf16", "_fp8"):
            if base.endswith(suffix + ".safetensors") and "checkpoint" not in base:
                ref = load_file(path.replace(suffix, "_f32"))
                assert ref.keys() == sd.keys(), base
                for k, v in sd.items():
                    assert same_bits(ref[k].to(v.dtype).contiguous(), v), (base, k)
        if "checkpoint" in base:
            ref = load_file(path.replace("flux_checkpoint_bf16", "flux_bf16"))
            for k, v in ref.items():
                assert same_bits(sd[PREFIX + k], v), (base, k)
        print(f"ok  {base}: {arch}, {len(sd)} tensors")
    reader = gguf.GGUFReader(os.path.join(d, "flux_f16.gguf"))
    ref = load_file(os.path.join(d, "flux_f32.safetensors"))
    for t in reader.tensors:
        v = ref[t.name].numpy()
        if t.tensor_type == gguf.GGMLQuantizationType.F16:
            v = v.astype(np.float16)
        assert np.asarray(t.data).tobytes() == v.tobytes(), t.name
    print(f"ok  flux_f16.gguf: {len(reader.tensors)} tensors")


if __name__ == "__main__":
    main()
