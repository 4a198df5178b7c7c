#!/usr/bin/env python3
"""Goldens for ComfyUI's quantized layouts (fp8_scaled, nvfp4, mxfp8), made with comfy-kitchen's
EAGER (CPU) quantizers and the per-tensor scale rules the file makers use.

Run (torch 2.15 CPU, safetensors 0.8, pip comfy-kitchen 0.2.40; any CPU, no GPU needed):

    /work/bench-venv/bin/python make_goldens.py [OUT_DIR]      # OUT_DIR defaults to this folder

Deterministic: every weight comes from a fixed torch.Generator seed or from explicit formulas
(no NaN or Inf anywhere), one torch thread, no safetensors metadata (its header map has no
stable order). Running twice gives byte-identical files.

Writes:
- source.safetensors        the source weights `<name>` (BF16, F32 or F16; shapes in manifest.json)
- fp8_scaled.safetensors    per layer `<name>.weight` F8_E4M3 [out,in], `<name>.weight_scale` F32 [],
                            `<name>.comfy_quant` U8 (JSON {"format": "float8_e4m3fn"})
- nvfp4.safetensors         `<name>.weight` U8 [R16, C16/2], `<name>.weight_scale` F8_E4M3
                            [roundup(R16,128), roundup(C16/16,4)] (to_blocked swizzle, as stored),
                            `<name>.weight_scale_2` F32 [], `<name>.comfy_quant` ({"format": "nvfp4"})
                            R16/C16 = rows/cols rounded up to 16 when either is not a multiple of 16
                            (ComfyUI's TensorCoreNVFP4Layout passes pad_16x=True then), else unchanged.
- mxfp8.safetensors         `<name>.weight` F8_E4M3 [R32, C32], `<name>.weight_scale` U8
                            [roundup(R32,128), roundup(C32/32,4)] (E8M0 codes, to_blocked swizzle),
                            `<name>.comfy_quant` ({"format": "mxfp8"}); R32/C32 as above with 32.
- dequant_<fmt>.safetensors      comfy-kitchen's dequantize_* with output_type=float32, cut back
                                 to the logical [out, in] (what QuantizedTensor.dequantize returns)
- dequant_<fmt>_bf16.safetensors the same with output_type=bfloat16 (ComfyUI's usual compute dtype;
                                 the rounding differs, see README.md)
- variants.safetensors      the alternatives README.md discusses, only where they differ from the
                            main goldens (`<name>.<variant>.<tensor>`): comfy-quants' own fp8 path
                            (f32 division), ComfyUI's layout per-tensor nvfp4 scale (computed in the
                            source dtype), and unpadded-rows nvfp4/mxfp8 as comfy-quants writes them.
- manifest.json             shapes, dtypes, scales (hex bits), difference counts, versions.

Per-tensor scale rules (README.md has the sources):
- fp8: comfy-quants `_quantize_float8`: amax = max|w| in f32; s = amax/448 (f32 division), clamped
  to >= 1e-12, and s = 1.0 for an all-zero tensor. F16 sources additionally get ComfyUI's
  `_TensorCoreFP8LayoutBase.quantize` guard s = 1/clamp(1/s, -65504, 65504) (else 1/s overflows
  F16 inside comfy-kitchen and zeros become NaN). Then comfy-kitchen `quantize_per_tensor_fp8(w, s)`.
- nvfp4: comfy-quants `quantize_nvfp4_block`: s2 = max|w| in f32 / 2688 (f32 division), stored as
  weight_scale_2; comfy-kitchen `quantize_nvfp4(w, max(s2, 2^-126), pad_16x=<needs padding>)`.
- mxfp8: no per-tensor scale; comfy-kitchen `quantize_mxfp8(w, pad_32x=<needs padding>)`.
"""

import hashlib
import importlib.metadata
import json
import os
import sys

import torch
from safetensors.torch import save_file

import comfy_kitchen as ck
from comfy_kitchen.float_utils import roundup

torch.set_num_threads(1)
OUT = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
F8 = torch.float8_e4m3fn
E2M1_E4M3 = 448.0 * 6.0


def f32(x):
    return torch.tensor(x, dtype=torch.float32)


def nextup(x, n=1):
    t = f32(x)
    for _ in range(n):
        t = torch.nextafter(t, f32(float("inf")))
    return t.item()


# ----------------------------------------------------------------------------- source weights
def make_sources():
    g = torch.Generator().manual_seed(20260512)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float32) * std

    src = {}
    w = randn(64, 128, std=0.02)
    w[5, 7] = 0.9  # outliers, as real weights have
    w[40, 100] = -1.3
    src["w_bf16_64x128"] = w.to(torch.bfloat16)
    src["w_f32_64x128"] = randn(64, 128, std=0.05)
    src["w_bf16_48x80"] = randn(48, 80, std=0.03).to(torch.bfloat16)  # mxfp8 pads cols 80->96
    src["w_bf16_130x96"] = randn(130, 96, std=0.02).to(torch.bfloat16)  # rows 130: pad 144 / 160
    src["w_f32_20x40"] = randn(20, 40, std=0.1)  # nvfp4 pads to 32x48, mxfp8 to 32x64
    src["w_f32_16x32"] = randn(16, 32)
    src["w_bf16_3x5"] = randn(3, 5).to(torch.bfloat16)  # nvfp4 pads to 16x16, mxfp8 to 32x32

    # f32 edge cases, global amax 2688 so nvfp4's per-tensor scale is exactly 1.0
    e = randn(32, 64, std=0.5)
    e[0, :] = 0.0  # all-zero row
    ties = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0, -0.0, 0.1, -0.1, 4.5, 2.25, 0.0]
    e[1, 0:16] = f32(ties)  # E2M1 ties with block scale 1
    e[1, 16:32] = f32(ties) * 0.125  # same ties with block scale 1/8
    e[1, 32:48] = -0.0  # block of negative zeros
    e[1, 48:64] = randn(16).clamp(-1, 1) * (6.0 * 2**-10)  # block scale 2^-10: fp8 tie -> 0
    e[1, 48] = 6.0 * 2**-10
    e[2, 0:16] = randn(16).clamp(-1, 1) * (6.0 * 2**-10 * 1.001)
    e[2, 0] = 6.0 * 2**-10 * 1.001  # block scale just above the tie -> 2^-9
    e[2, 16:32] = randn(16).clamp(-1, 1) * 1e-4  # block scale underflows fp8 -> 0
    e[2, 32] = 2688.0  # the global amax
    e[2, 33] = -2688.0
    # mxfp8: block amax just above 448*2^k, where torch's f32 log2 rounds to k (ceil gives k, not k+1)
    ks = [-5, -10, -20, -30, -40, -60, -100, -120]
    for i, k in enumerate(ks):
        r, c = 3 + i // 2, (i % 2) * 32
        e[r, c:c + 32] = randn(32).clamp(-1, 1) * (448.0 * 2.0**k)
        e[r, c + 3] = nextup(448.0 * 2.0**k, 1 + (i % 3))
    # mxfp8: tiny f32 blocks: amax/448 below 2^-127 (E8M0 code 0, decoded as 0.0) and just above 2^-126
    e[7, 0:32] = torch.linspace(1e-38, 3e-38, 32)  # no zero in this block (0/0 would give NaN)
    e[7, 32:64] = torch.linspace(-1.0, 1.0, 32) * (448.0 * 1.5 * 2.0**-126)
    e[8, :] = torch.linspace(-1e-30, 1e-30, 64)  # flush to zero in fp8 (keeps the sign)
    src["w_f32_edge_32x64"] = e

    # fp8 ties: amax 448 so the fp8 scale is exactly 1.0 and x * (1/s) is exact
    t = randn(16, 32, std=30.0).clamp(-440, 440)
    t[0, :16] = f32([448.0, -448.0, 1.0625, 1.1875, -1.0625, 2**-10, 3 * 2**-10, -(2**-10),
                     -0.0, 0.0, 1e-30, -1e-30, 2**-9 + 2**-11, 240.0 + 8.0, 288.0 + 16.0, 0.5])
    src["w_f32_fp8ties_16x32"] = t

    wide = randn(32, 48) * torch.pow(10.0, (torch.rand(32, 48, generator=g) * 60.0 - 30.0))
    wide[0, 0] = 3.0e38  # near the bf16 / f32 maximum
    wide[31, 47] = -1.0e-38
    src["w_bf16_wide_32x48"] = wide.to(torch.bfloat16)

    z = torch.zeros(32, 64)
    z[::3, ::5] = -0.0  # an all-zero tensor with some negative zeros
    src["w_bf16_zero_32x64"] = z.to(torch.bfloat16)
    src["w_bf16_tiny_16x32"] = (randn(16, 32) * 1e-10).to(torch.bfloat16)  # fp8 scale hits the 1e-12 floor
    src["w_f16_small_32x64"] = randn(32, 64, std=0.001).to(torch.float16)  # 448/amax > 65504
    for k, v in src.items():
        assert torch.isfinite(v.float()).all(), k
    return src


# ----------------------------------------------------------------------------- scale rules
def fp8_scale(w):
    amax = w.detach().to(torch.float32).abs().max()
    s = torch.where(amax > 0, torch.clamp(amax / 448.0, min=1.0e-12), torch.ones_like(amax))
    if w.dtype not in (torch.float32, torch.bfloat16):
        info = torch.finfo(w.dtype)
        s = 1.0 / torch.clamp(1.0 / s, min=info.min, max=info.max)
    return s.to(torch.float32)


def nvfp4_scale(w):
    return w.detach().to(torch.float32).abs().amax() / E2M1_E4M3


def nvfp4_scale_comfyui_layout(w):
    # comfy/quant_ops.py TensorCoreNVFP4Layout.quantize: computed in the source dtype
    return (torch.amax(w.abs()) / E2M1_E4M3).to(torch.float32)


def needs_pad(shape, m):
    return shape[0] % m != 0 or shape[1] % m != 0


# ----------------------------------------------------------------------------- quantizers
def q_fp8(w):
    s = fp8_scale(w)
    return ck.quantize_per_tensor_fp8(w, s, F8), s


def q_fp8_comfy_quants_division(w):
    # comfy-quants backends/inference_model_export.py::_quantize_float8 (its own path, no kitchen)
    v = w.detach().to(torch.float32)
    amax = v.abs().max()
    s = torch.where(amax > 0, torch.clamp(amax / 448.0, min=1.0e-12), torch.ones_like(amax))
    return (v / s).clamp(-448.0, 448.0).to(F8)


def q_nvfp4(w, s2, pad=None):
    pad = needs_pad(w.shape, 16) if pad is None else pad
    q, bs = ck.quantize_nvfp4(w, torch.clamp(s2, min=2.0**-126), pad_16x=pad)
    return q, bs


def q_mxfp8(w, pad=None):
    pad = needs_pad(w.shape, 32) if pad is None else pad
    q, bs = ck.quantize_mxfp8(w, pad_32x=pad)
    return q, bs.view(torch.uint8)


def marker(fmt):
    # ComfyUI's own state_dict writes json.dumps(conf) with default separators
    return torch.tensor(list(json.dumps({"format": fmt}).encode("utf-8")), dtype=torch.uint8)


def bits_hex(t):
    return "0x%08x" % (t.detach().to(torch.float32).reshape(1).view(torch.int32).item() & 0xFFFFFFFF)


def nbytes_differ(a, b):
    if a.shape != b.shape:
        return -1
    return int((a.contiguous().view(torch.uint8) != b.contiguous().view(torch.uint8)).sum().item())


def main():
    os.makedirs(OUT, exist_ok=True)
    src = make_sources()
    files = {k: {} for k in ["fp8_scaled", "nvfp4", "mxfp8", "dequant_fp8_scaled", "dequant_nvfp4",
                             "dequant_mxfp8", "dequant_fp8_scaled_bf16", "dequant_nvfp4_bf16",
                             "dequant_mxfp8_bf16", "variants"]}
    manifest = {"tensors": {}, "versions": {
        "torch": torch.__version__, "comfy_kitchen": importlib.metadata.version("comfy-kitchen"),
        "safetensors": __import__("safetensors").__version__}}
    with ck.use_backend("eager"):
        for name, w in src.items():
            R, C = w.shape
            info = {"shape": [R, C], "dtype": str(w.dtype).replace("torch.", "")}

            q, s = q_fp8(w)
            files["fp8_scaled"].update({f"{name}.weight": q, f"{name}.weight_scale": s,
                                        f"{name}.comfy_quant": marker("float8_e4m3fn")})
            files["dequant_fp8_scaled"][name] = ck.dequantize_per_tensor_fp8(q, s, torch.float32)
            files["dequant_fp8_scaled_bf16"][name] = ck.dequantize_per_tensor_fp8(q, s, torch.bfloat16)
            qd = q_fp8_comfy_quants_division(w)
            # for F16 the scale itself differs (ComfyUI's guard), so the count is not comparable
            info["fp8"] = {"weight_scale": bits_hex(s), "weight_scale_value": s.item(),
                           "comfy_quants_division_path_bytes_differing":
                               None if w.dtype == torch.float16 else nbytes_differ(q, qd)}
            if w.dtype != torch.float16 and nbytes_differ(q, qd) > 0:
                files["variants"][f"{name}.fp8_comfy_quants_division.weight"] = qd

            s2 = nvfp4_scale(w)
            q4, bs4 = q_nvfp4(w, s2)
            files["nvfp4"].update({f"{name}.weight": q4, f"{name}.weight_scale": bs4,
                                   f"{name}.weight_scale_2": s2, f"{name}.comfy_quant": marker("nvfp4")})
            files["dequant_nvfp4"][name] = ck.dequantize_nvfp4(q4, s2, bs4, torch.float32)[:R, :C].contiguous()
            files["dequant_nvfp4_bf16"][name] = ck.dequantize_nvfp4(q4, s2, bs4, torch.bfloat16)[:R, :C].contiguous()
            info["nvfp4"] = {"weight_scale_2": bits_hex(s2), "weight_scale_2_value": s2.item(),
                             "padded": needs_pad(w.shape, 16), "weight_shape": list(q4.shape),
                             "weight_scale_shape": list(bs4.shape)}
            s2c = nvfp4_scale_comfyui_layout(w)
            if s2c.item() != s2.item():
                q4c, bs4c = q_nvfp4(w, s2c)
                files["variants"].update({f"{name}.nvfp4_comfyui_layout_scale.weight": q4c,
                                          f"{name}.nvfp4_comfyui_layout_scale.weight_scale": bs4c,
                                          f"{name}.nvfp4_comfyui_layout_scale.weight_scale_2": s2c})
                info["nvfp4"]["comfyui_layout_scale"] = bits_hex(s2c)
                info["nvfp4"]["comfyui_layout_scale_bytes_differing"] = {
                    "weight": nbytes_differ(q4, q4c), "weight_scale": nbytes_differ(bs4, bs4c)}

            q8, bs8 = q_mxfp8(w)
            files["mxfp8"].update({f"{name}.weight": q8, f"{name}.weight_scale": bs8,
                                   f"{name}.comfy_quant": marker("mxfp8")})
            bs8e = bs8.view(torch.float8_e8m0fnu)
            files["dequant_mxfp8"][name] = ck.dequantize_mxfp8(q8, bs8e, torch.float32)[:R, :C].contiguous()
            files["dequant_mxfp8_bf16"][name] = ck.dequantize_mxfp8(q8, bs8e, torch.bfloat16)[:R, :C].contiguous()
            info["mxfp8"] = {"padded": needs_pad(w.shape, 32), "weight_shape": list(q8.shape),
                             "weight_scale_shape": list(bs8.shape)}

            # comfy-quants writes rows unpadded (it only requires in % 16 == 0 / in % 32 == 0)
            if R % 16 != 0 and C % 16 == 0:
                q4u, bs4u = q_nvfp4(w, s2, pad=False)
                files["variants"].update({f"{name}.nvfp4_rows_unpadded.weight": q4u,
                                          f"{name}.nvfp4_rows_unpadded.weight_scale": bs4u})
            if R % 32 != 0 and C % 32 == 0:
                q8u, bs8u = q_mxfp8(w, pad=False)
                files["variants"].update({f"{name}.mxfp8_rows_unpadded.weight": q8u,
                                          f"{name}.mxfp8_rows_unpadded.weight_scale": bs8u})
            manifest["tensors"][name] = info

    save_file({k: v.contiguous() for k, v in src.items()}, os.path.join(OUT, "source.safetensors"))
    for fname, tensors in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, f"{fname}.safetensors"))
    digests = {}
    for fname in ["source"] + list(files):
        path = os.path.join(OUT, f"{fname}.safetensors")
        with open(path, "rb") as fh:
            data = fh.read()
        assert len(data) < 200_000, (fname, len(data))
        os.chmod(path, 0o644)
        digests[f"{fname}.safetensors"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest["files"] = digests
    with open(os.path.join(OUT, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
        fh.write("\n")
    for k, v in digests.items():
        print(f"{k:36s} {v['bytes']:7d}  {v['sha256'][:16]}")


if __name__ == "__main__":
    main()
