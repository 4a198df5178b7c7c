#!/usr/bin/env python3
"""Load convcache's GGUF outputs through ComfyUI-GGUF's own loader and dequantizer, compare with
the source models. Not for CI: needs torch, gguf, safetensors, tqdm and a ComfyUI-GGUF checkout.

    git clone https://github.com/city96/ComfyUI-GGUF /tmp/ComfyUI-GGUF     # tested at 795e451
    GGUF_CHECK_DIR=/tmp/gguf_check cargo test -p smart --test gguf_fixtures
    /work/pyref/bin/python crates/gguf/tests/golden/convert/compare_comfyui.py /tmp/gguf_check \
        [--comfy /tmp/ComfyUI-GGUF]

Nothing of ComfyUI-GGUF is reimplemented: `loader.gguf_sd_loader` builds the state dict (prefix,
architecture check, `comfy.gguf.orig_shape`, BF16 1-D fix) and `dequant.dequantize_tensor`
dequantizes with its torch kernels. Only ComfyUI itself is stubbed (`comfy.ops`, `comfy.lora`,
`comfy.model_management`, imported by `ops.py` for its layer classes, unused here).

Per output `<fixture>_<target>.gguf`, against `fixtures/<fixture>.safetensors`:
- the state dict has exactly the source's keys (prefix stripped, dropped tensors excepted) with
  the source's shapes (what ComfyUI's model detection reads);
- F32/F16/BF16 tensors equal the source rounded to that type;
- quantized tensors are within a per-type relative RMS error of the source;
- ComfyUI-GGUF's dequantization equals convcache's (`<name>.ours.safetensors`, f32): to 2^-20
  with `dequant_dtype=float32`, and to f16 precision (2^-9 of the tensor's max) with its default,
  which does the block arithmetic in the scales' f16.
"""

import argparse
import glob
import importlib
import os
import sys
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", "..", "..", ".."))

# Loose ceilings on relative RMS error (||deq - src|| / ||src||) for the fixture weights
# (normal values, rare x16 outliers). They catch a wrong layout or scale, not fine quality.
MAX_REL_RMS = {"Q8_0": 0.02, "Q6_K": 0.05, "Q5_K": 0.06, "Q5_0": 0.08, "Q5_1": 0.08,
               "Q4_K": 0.12, "Q4_0": 0.15, "Q4_1": 0.15, "Q3_K": 0.25, "Q2_K": 0.45}


TARGETS = ["Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q2_K", "Q6_K",
           "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16", "F16", "F32"]


def stub_comfy():
    import torch

    comfy = types.ModuleType("comfy")
    ops = types.ModuleType("comfy.ops")

    class manual_cast:
        class Linear(torch.nn.Linear):
            pass

        class Conv2d(torch.nn.Conv2d):
            pass

        class Embedding(torch.nn.Embedding):
            pass

        class LayerNorm(torch.nn.LayerNorm):
            pass

        class GroupNorm(torch.nn.GroupNorm):
            pass

    ops.manual_cast = manual_cast
    ops.cast_to = lambda t, *a, **k: t
    lora = types.ModuleType("comfy.lora")
    mm = types.ModuleType("comfy.model_management")
    mm.device_supports_non_blocking = lambda d: False
    comfy.ops, comfy.lora, comfy.model_management = ops, lora, mm
    sys.modules.update({"comfy": comfy, "comfy.ops": ops, "comfy.lora": lora,
                        "comfy.model_management": mm})


def import_comfyui_gguf(path):
    """The package's modules without running its __init__ (which needs ComfyUI's nodes)."""
    pkg = types.ModuleType("comfyui_gguf")
    pkg.__path__ = [path]
    sys.modules["comfyui_gguf"] = pkg
    return (importlib.import_module("comfyui_gguf.loader"),
            importlib.import_module("comfyui_gguf.dequant"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--comfy", default="/tmp/ComfyUI-GGUF")
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file

    stub_comfy()
    loader, dequant = import_comfyui_gguf(args.comfy)
    files = sorted(glob.glob(os.path.join(args.dir, "*.gguf")))
    if not files:
        sys.exit(f"no .gguf files in {args.dir}")
    bad = 0
    worst = {}
    for path in files:
        base = os.path.basename(path)[: -len(".gguf")]
        target = next(t for t in TARGETS if base.endswith("_" + t))
        stem = base[: -len(target) - 1]
        src = load_file(os.path.join(REPO, "fixtures", stem + ".safetensors"))
        if any(k.startswith("model.diffusion_model.") for k in src):
            src = {k[len("model.diffusion_model."):]: v for k, v in src.items()
                   if k.startswith("model.diffusion_model.")}
        ours = load_file(path[: -len(".gguf")] + ".ours.safetensors")
        sd, arch = loader.gguf_sd_loader(path, return_arch=True)
        problems = []
        dropped = {k for k in src if k not in sd}
        if any(src[k].numel() != 0 and src[k].is_floating_point() for k in dropped):
            problems.append(f"missing keys {sorted(dropped)[:3]}")
        for key, t in sd.items():
            s = src[key]
            shape = tuple(getattr(t, "tensor_shape", t.shape))
            want_shape = tuple(s.shape) if s.dim() > 0 else (1,)
            if shape != want_shape:
                problems.append(f"{key}: shape {shape} != source {want_shape}")
                continue
            qtype = getattr(t, "tensor_type", None)
            name = getattr(qtype, "name", "F32")
            # ComfyUI's default (dequant_dtype None) computes in the scales' f16; with f32 its
            # kernels do ggml's arithmetic in f32. Both are checked against ours.
            deq = dequant.dequantize_tensor(t, dtype=torch.float32).reshape(want_shape)
            deq32 = dequant.dequantize_tensor(
                t, dtype=torch.float32, dequant_dtype=torch.float32).reshape(want_shape)
            ref = s.to(torch.float32).reshape(want_shape)
            mine = ours[key].reshape(want_shape)
            scale = float(mine.abs().max()) or 1.0
            if not torch.allclose(deq32, mine, rtol=2 ** -20, atol=2 ** -20 * scale):
                problems.append(f"{key} ({name}): ComfyUI f32 dequant != convcache dequant")
            if not torch.allclose(deq, mine, rtol=2 ** -10, atol=2 ** -9 * scale):
                problems.append(f"{key} ({name}): ComfyUI f16 dequant != convcache dequant")
            if name in ("F32", "F16", "BF16"):
                # Equal to the source rounded through that type (through F16 first when an F32
                # source took an F16 base then a K-quant fallback — same values).
                dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[name]
                if not torch.equal(deq, ref.to(dt).to(torch.float32)):
                    problems.append(f"{key} ({name}): not the source rounded to {name}")
            else:
                err = float(torch.linalg.vector_norm(deq - ref) /
                            max(float(torch.linalg.vector_norm(ref)), 1e-30))
                worst[name] = max(worst.get(name, 0.0), err)
                if err > MAX_REL_RMS[name]:
                    problems.append(f"{key} ({name}): relative RMS error {err:.3g}")
        bad += bool(problems)
        print(f"{base}: arch {arch}, {len(sd)} tensors "
              + ("ok" if not problems else "FAIL " + "; ".join(problems[:4])))
    print(f"{len(files)} files through ComfyUI-GGUF's loader: "
          f"{'all match' if not bad else f'{bad} differ'}; worst relative RMS error per type: "
          + ", ".join(f"{k} {v:.3g}" for k, v in sorted(worst.items())))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
