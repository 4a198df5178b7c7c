"""Checks a convcache fp8_scaled / nvfp4 output of the bench against comfy-kitchen.

usage: comfy_check.py CONVCACHE_OUT PEER_OUT CONVCACHE_FP32

- CONVCACHE_OUT: `convcache convert SRC --to fp8_scaled|nvfp4`
- PEER_OUT: `comfy_quantize.py SRC PEER_OUT fp8_scaled|nvfp4` of the same SRC
- CONVCACHE_FP32: `convcache convert CONVCACHE_OUT --to fp32` (convcache's own reading of it)

Checks that both files have the same tensors with the same dtypes, shapes and bytes, and that
comfy-kitchen's eager `dequantize_*` (float32 output, cut to the logical shape) of every
quantized layer of CONVCACHE_OUT equals what convcache reads (CONVCACHE_FP32), bit for bit.
"""

import json
import sys

import torch
from safetensors import safe_open

import comfy_kitchen as ck


def dequantize(f, layer: str) -> torch.Tensor:
    conf = json.loads(bytes(f.get_tensor(f"{layer}.comfy_quant").tolist()).decode("utf-8"))
    q = f.get_tensor(f"{layer}.weight")
    scale = f.get_tensor(f"{layer}.weight_scale")
    if conf["format"] == "float8_e4m3fn":
        full = ck.dequantize_per_tensor_fp8(q, scale, torch.float32)
    elif conf["format"] == "nvfp4":
        full = ck.dequantize_nvfp4(q, f.get_tensor(f"{layer}.weight_scale_2"), scale, torch.float32)
    else:
        raise SystemExit(f"{layer}: format {conf['format']} is not checked here")
    rows, cols = conf.get("orig_shape", list(full.shape))
    return full[:rows, :cols]


def main() -> None:
    ours_path, peer_path, fp32_path = sys.argv[1:4]
    with safe_open(ours_path, "pt") as ours, safe_open(peer_path, "pt") as peer, \
            safe_open(fp32_path, "pt") as fp32, ck.use_backend("eager"):
        if set(ours.keys()) != set(peer.keys()):
            raise SystemExit(f"key sets differ: {sorted(set(ours.keys()) ^ set(peer.keys()))[:10]}")
        names = list(ours.keys())
        for name in names:
            a, b = ours.get_tensor(name), peer.get_tensor(name)
            if a.dtype != b.dtype or a.shape != b.shape:
                raise SystemExit(f"{name}: {a.dtype} {list(a.shape)} vs the peer's {b.dtype} {list(b.shape)}")
            if not torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):
                raise SystemExit(f"{name}: bytes differ from the peer's")
        layers = [k[: -len(".comfy_quant")] for k in names if k.endswith(".comfy_quant")]
        for layer in layers:
            kitchen = dequantize(ours, layer)
            convcache = fp32.get_tensor(f"{layer}.weight")
            if kitchen.shape != convcache.shape or not torch.equal(
                kitchen.view(torch.int32), convcache.view(torch.int32)
            ):
                raise SystemExit(f"{layer}: comfy-kitchen's dequantization differs from convcache's reading")
    print(f"ok: {len(names)} tensors identical to the peer's; "
          f"{len(layers)} quantized layers dequantize in comfy-kitchen to convcache's reading")


if __name__ == "__main__":
    main()
