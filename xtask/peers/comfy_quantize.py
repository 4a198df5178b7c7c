"""ComfyUI's fp8_scaled / nvfp4 quantization done in Python with comfy-kitchen's eager (CPU)
functions, tensor by tensor, the way a conversion script (Comfy-Org's comfy-quants) does it: a
benchmark peer.

usage: comfy_quantize.py SRC DST fp8_scaled|nvfp4 [--fsync]

Tensors are read one at a time with `safetensors.safe_open` (framework pt). A weight is
quantized by the rule convcache uses for Flux (`comfyquant::layers`, mirrored here, not read
from convcache's output): a float 2-D `*.weight` under `double_blocks.` / `single_blocks.` with
no name segment that is a norm, an embedder or a modulation. Its per-tensor scale follows
comfy-quants (the same rule as the goldens' make_goldens.py), and the bytes come from
comfy-kitchen under `ck.use_backend("eager")`:
- fp8_scaled: `weight_scale = amax/448` (f32, floored at 1e-12, 1.0 for an all-zero tensor),
  `quantize_per_tensor_fp8(w, weight_scale, float8_e4m3fn)`.
- nvfp4: `weight_scale_2 = amax/2688` (f32), `quantize_nvfp4(w, max(weight_scale_2, 2^-126),
  pad_16x=...)`, whose block scales come back in the blocked (`to_blocked`) layout.
Each quantized layer also gets `<layer>.comfy_quant` (U8, `json.dumps({"format": ...})`). Every
other tensor is kept, f32 cast to bf16. The output is collected in a dict and written with
`safetensors.torch.save_file`. torch uses its default thread count (all CPUs, as convcache).

With --fsync the output and its directory are fsynced before exiting: the durability of
convcache's default mode, for a like-with-like comparison (conversion scripts do not fsync).
"""

import json
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import comfy_kitchen as ck

BLOCKS = ("double_blocks.", "single_blocks.")
PREFIX = "model.diffusion_model."
FORMATS = {"fp8_scaled": "float8_e4m3fn", "nvfp4": "nvfp4"}


def kept_segment(segment: str) -> bool:
    s = segment.lower()
    return "norm" in s or "embed" in s or "adaln" in s or s.startswith("mod") or s.endswith("_mod")


def quantized(name: str, t: torch.Tensor) -> bool:
    short = name[len(PREFIX):] if name.startswith(PREFIX) else name
    return (
        short.endswith(".weight")
        and t.is_floating_point()
        and t.dim() == 2
        and t.numel() > 0
        and short.startswith(BLOCKS)
        and not any(kept_segment(s) for s in short.split("."))
    )


def marker(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def fp8_scaled(w: torch.Tensor) -> dict:
    amax = w.to(torch.float32).abs().max()
    s = torch.where(amax > 0, torch.clamp(amax / 448.0, min=1.0e-12), torch.ones_like(amax))
    if w.dtype not in (torch.float32, torch.bfloat16):
        info = torch.finfo(w.dtype)
        s = 1.0 / torch.clamp(1.0 / s, min=info.min, max=info.max)
    s = s.to(torch.float32)
    q = ck.quantize_per_tensor_fp8(w, s, torch.float8_e4m3fn)
    return {"weight": q, "weight_scale": s, "comfy_quant": marker({"format": "float8_e4m3fn"})}


def nvfp4(w: torch.Tensor) -> dict:
    rows, cols = w.shape
    s2 = w.to(torch.float32).abs().amax() / (448.0 * 6.0)
    pad = rows % 16 != 0 or cols % 16 != 0
    q, block_scales = ck.quantize_nvfp4(w, torch.clamp(s2, min=2.0**-126), pad_16x=pad)
    conf = {"format": "nvfp4"}
    if pad:
        conf["orig_shape"] = [rows, cols]
    return {"weight": q, "weight_scale": block_scales, "weight_scale_2": s2, "comfy_quant": marker(conf)}


def main() -> None:
    src, dst, target = sys.argv[1:4]
    fsync = sys.argv[4:] == ["--fsync"]
    if sys.argv[4:] and not fsync:
        sys.exit(f"comfy_quantize.py: unknown arguments {sys.argv[4:]}")
    quantize = {"fp8_scaled": fp8_scaled, "nvfp4": nvfp4}[target]
    out = {}
    with safe_open(src, framework="pt") as f, ck.use_backend("eager"):
        metadata = f.metadata()
        for name in f.keys():
            t = f.get_tensor(name)
            if quantized(name, t):
                layer = name[: -len(".weight")]
                for k, v in quantize(t).items():
                    out[f"{layer}.{k}"] = v
            else:
                out[name] = t.to(torch.bfloat16) if t.dtype == torch.float32 else t
    save_file(out, dst, metadata=metadata)
    if fsync:
        for path in (dst, os.path.dirname(os.path.abspath(dst))):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


if __name__ == "__main__":
    main()
