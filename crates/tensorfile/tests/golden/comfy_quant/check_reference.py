#!/usr/bin/env python3
"""Independent check of README.md: a numpy-only reimplementation (no torch, no comfy-kitchen) of the
algorithms described there, compared byte for byte with the goldens make_goldens.py wrote.

    python3 check_reference.py [GOLDEN_DIR]     # needs only numpy

It is the step-by-step recipe a Rust port follows; every arithmetic step is an IEEE f32 operation
(round to nearest even) unless it says otherwise.
"""

import json
import os
import struct
import sys

import numpy as np

DIR = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
np.seterr(all="ignore")
F32 = np.float32
NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U8": np.uint8, "F8_E4M3": np.uint8}


def load(path):
    """Minimal safetensors reader: u64 header length, JSON header, raw little-endian data."""
    with open(path, "rb") as fh:
        data = fh.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for name, d in header.items():
        if name == "__metadata__":
            continue
        a, b = d["data_offsets"]
        arr = np.frombuffer(data[8 + n + a:8 + n + b], dtype=NP[d["dtype"]]).reshape(d["shape"])
        out[name] = (d["dtype"], arr)
    return out


# ----------------------------------------------------------------------------- number formats
def bf16_to_f32(u):
    return (u.astype(np.uint32) << 16).view(F32)


def f32_to_bf16(x):  # round to nearest even (no NaN here)
    b = np.asarray(x, F32).view(np.uint32).astype(np.uint64)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def f32_to_e4m3fn(x):
    """c10::detail::fp8e4m3fn_from_fp32_value: RNE; |x| >= 480 -> NaN (0x7F); sign always kept."""
    b = np.asarray(x, F32).view(np.uint32).astype(np.int64)
    sign = b & 0x80000000
    b = b ^ sign
    out = np.empty(b.shape, np.int64)
    nan = b >= (1087 << 20)
    den = (~nan) & (b < (121 << 23))
    nor = ~(nan | den)
    out[nan] = 0x7F
    # subnormal range: add 2^-5... via the float trick (f32 addition rounds to the 2^-9 grid)
    dm = F32(np.array([141 << 23], np.uint32).view(F32)[0])
    f = (b[den].astype(np.uint32).view(F32) + dm).view(np.uint32).astype(np.int64)
    out[den] = f - (141 << 23)
    m = b[nor]
    m = m + ((7 - 127) << 23) + 0x7FFFF + ((m >> 20) & 1)
    out[nor] = m >> 20
    return (out | (sign >> 24)).astype(np.uint8)


def _e4m3_table():
    t = np.zeros(256, F32)
    for c in range(256):
        s = -1.0 if c & 0x80 else 1.0
        e, m = (c >> 3) & 0xF, c & 7
        if e == 0xF and m == 7:
            t[c] = np.nan
        elif e == 0:
            t[c] = s * m * 2.0**-9
        else:
            t[c] = s * (1 + m / 8) * 2.0 ** (e - 7)
    return t


E4M3 = _e4m3_table()
E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], F32)


def f32_to_e2m1(v):
    """RNE onto {0,.5,1,1.5,2,3,4,6}, ties to the even code, saturating at 6; sign bit always kept."""
    a = np.abs(v)
    code = np.select([a <= .25, a < .75, a <= 1.25, a < 1.75, a <= 2.5, a < 3.5, a <= 5.0],
                     [0, 1, 2, 3, 4, 5, 6], 7).astype(np.uint8)
    return code | (np.signbit(v).astype(np.uint8) << 3)


def to_f32(dtype, arr):
    return {"F32": lambda a: a.astype(F32), "BF16": bf16_to_f32, "F16": lambda a: a.astype(F32)}[dtype](arr)


def roundup(x, m):
    return (x + m - 1) // m * m


def to_blocked(grid):
    """cuBLAS block-scale layout: element (r, c) of the zero-padded [roundup(H,128), roundup(W,4)]
    grid goes to flat index ((r//128)*ncb + c//4)*512 + (r%32)*16 + ((r%128)//32)*4 + c%4."""
    H, W = grid.shape
    Hp, Wp = roundup(H, 128), roundup(W, 4)
    ncb = Wp // 4
    out = np.zeros(Hp * Wp, grid.dtype)
    r, c = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    idx = ((r // 128) * ncb + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
    out[idx.ravel()] = grid.ravel()
    return out.reshape(Hp, Wp)


def from_blocked(b, H, W):
    r, c = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    ncb = roundup(W, 4) // 4
    idx = ((r // 128) * ncb + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
    return b.ravel()[idx]


def pad(x, R, C):
    out = np.zeros((R, C), F32)
    out[:x.shape[0], :x.shape[1]] = x
    return out


# ----------------------------------------------------------------------------- fp8 per tensor
def fp8_scale(dtype, xf):
    amax = F32(np.abs(xf).max())
    s = F32(max(F32(amax / F32(448.0)), F32(1e-12))) if amax > 0 else F32(1.0)
    if dtype == "F16":  # ComfyUI: 1 / clamp(1/s, -65504, 65504), all in f32
        s = F32(F32(1.0) / F32(min(F32(F32(1.0) / s), F32(65504.0))))
    return s


def fp8_quant(dtype, raw, xf, s):
    inv = F32(F32(1.0) / s)  # comfy-kitchen: x * (1/scale).to(x.dtype), product in x's dtype
    if dtype == "BF16":
        p = bf16_to_f32(f32_to_bf16(xf * bf16_to_f32(f32_to_bf16(inv))))
    elif dtype == "F16":
        p = (xf * F32(np.float16(inv))).astype(np.float16).astype(F32)
    else:
        p = xf * inv
    return f32_to_e4m3fn(np.clip(p, F32(-448), F32(448)))


def fp8_quant_division(xf):  # comfy-quants' own exporter
    amax = F32(np.abs(xf).max())
    s = F32(max(F32(amax / F32(448.0)), F32(1e-12))) if amax > 0 else F32(1.0)
    return f32_to_e4m3fn(np.clip(xf / s, F32(-448), F32(448)))


def fp8_dequant(q, s, bf16):
    if bf16:
        return f32_to_bf16(E4M3[q] * bf16_to_f32(f32_to_bf16(s)))  # both factors bf16, product rounded
    return E4M3[q] * s


# ----------------------------------------------------------------------------- nvfp4
def nvfp4_quant(xf, s2, pad_rows=True):
    R, C = xf.shape
    padded = R % 16 or C % 16
    Rp, Cp = (roundup(R, 16), roundup(C, 16)) if (padded and pad_rows) else (R, C)
    x = pad(xf, Rp, Cp).reshape(Rp, Cp // 16, 16)
    sdiv = F32(max(s2, F32(2.0**-126)))
    bscale = np.abs(x).max(-1) / F32(6.0)
    sc = np.minimum(bscale / sdiv, F32(448.0))
    code = f32_to_e4m3fn(sc)
    total = sdiv * E4M3[code]
    safe = np.where(total == 0, F32(1), total)
    data = np.where((total == 0)[..., None], F32(0), x / safe[..., None])
    data = np.clip(data, F32(-6), F32(6)).reshape(Rp, Cp)
    n = f32_to_e2m1(data)
    packed = (n[:, 0::2] << 4) | n[:, 1::2]  # even element in the high nibble
    return packed.astype(np.uint8), to_blocked(code)


def nvfp4_dequant(q, bs, s2, R, C, bf16):
    codes = np.stack([q >> 4, q & 15], -1).reshape(q.shape[0], -1)
    Rp, Cp = codes.shape
    sc = from_blocked(bs, Rp, Cp // 16)
    if bf16:
        total = f32_to_bf16(bf16_to_f32(f32_to_bf16(s2)) * E4M3[sc])
        out = f32_to_bf16(E2M1[codes].reshape(Rp, -1, 16) * bf16_to_f32(total)[..., None])
    else:
        out = E2M1[codes].reshape(Rp, -1, 16) * (s2 * E4M3[sc])[..., None]
    return out.reshape(Rp, Cp)[:R, :C]


# ----------------------------------------------------------------------------- mxfp8
def mxfp8_quant(xf, pad_rows=True):
    R, C = xf.shape
    padded = R % 32 or C % 32
    Rp, Cp = (roundup(R, 32), roundup(C, 32)) if (padded and pad_rows) else (R, C)
    x = pad(xf, Rp, Cp).reshape(Rp, Cp // 32, 32)
    amax = np.abs(x).max(-1)
    need = np.maximum(amax / F32(448.0), F32(2.0**-127))
    e = np.ceil(np.log2(need.astype(np.float64)).astype(F32)).astype(np.int64)  # f32-rounded log2
    code = np.clip(e + 127, 0, 254).astype(np.uint32)
    scale = np.where(code == 0, 0, code << 23).astype(np.uint32).view(F32)
    zero = amax == 0
    data = np.where(zero[..., None], F32(0), x / np.where(zero, F32(1), scale)[..., None])
    q = f32_to_e4m3fn(np.clip(data, F32(-448), F32(448)).reshape(Rp, Cp))
    return q, to_blocked(np.where(zero, 0, code).astype(np.uint8))


def mxfp8_dequant(q, bs, R, C, bf16):
    Rp, Cp = q.shape
    code = from_blocked(bs, Rp, Cp // 32).astype(np.uint32)
    scale = np.where(code == 0, 0, code << 23).astype(np.uint32).view(F32)
    out = (E4M3[q].reshape(Rp, -1, 32) * scale[..., None]).reshape(Rp, Cp)[:R, :C]
    return f32_to_bf16(out) if bf16 else out


# ----------------------------------------------------------------------------- compare
def main():
    src = load(os.path.join(DIR, "source.safetensors"))
    g = {k: load(os.path.join(DIR, f"{k}.safetensors")) for k in
         ["fp8_scaled", "nvfp4", "mxfp8", "dequant_fp8_scaled", "dequant_nvfp4", "dequant_mxfp8",
          "dequant_fp8_scaled_bf16", "dequant_nvfp4_bf16", "dequant_mxfp8_bf16", "variants"]}
    fails, checks = [], 0

    def same(label, ours, theirs):
        nonlocal checks
        checks += 1
        ours = np.ascontiguousarray(ours)
        theirs = np.ascontiguousarray(theirs)
        if ours.shape != theirs.shape or ours.tobytes() != theirs.tobytes():
            n = -1 if ours.shape != theirs.shape else int((ours.view(np.uint8) != theirs.view(np.uint8)).sum())
            fails.append(f"{label}: shape {ours.shape} vs {theirs.shape}, bytes differing {n}")

    for name, (dtype, raw) in src.items():
        xf = to_f32(dtype, raw)
        R, C = xf.shape
        s = fp8_scale(dtype, xf)
        q = fp8_quant(dtype, raw, xf, s)
        same(f"{name} fp8 weight_scale", np.array(s, F32), g["fp8_scaled"][f"{name}.weight_scale"][1])
        same(f"{name} fp8 weight", q, g["fp8_scaled"][f"{name}.weight"][1])
        same(f"{name} fp8 dequant f32", fp8_dequant(q, s, False), g["dequant_fp8_scaled"][name][1])
        same(f"{name} fp8 dequant bf16", fp8_dequant(q, s, True), g["dequant_fp8_scaled_bf16"][name][1])
        key = f"{name}.fp8_comfy_quants_division.weight"
        if key in g["variants"]:
            same(f"{name} fp8 comfy-quants division", fp8_quant_division(xf), g["variants"][key][1])

        s2 = F32(F32(np.abs(xf).max()) / F32(2688.0))
        q4, bs4 = nvfp4_quant(xf, s2)
        same(f"{name} nvfp4 weight_scale_2", np.array(s2, F32), g["nvfp4"][f"{name}.weight_scale_2"][1])
        same(f"{name} nvfp4 weight", q4, g["nvfp4"][f"{name}.weight"][1])
        same(f"{name} nvfp4 weight_scale", bs4, g["nvfp4"][f"{name}.weight_scale"][1])
        same(f"{name} nvfp4 dequant f32", nvfp4_dequant(q4, bs4, s2, R, C, False), g["dequant_nvfp4"][name][1])
        same(f"{name} nvfp4 dequant bf16", nvfp4_dequant(q4, bs4, s2, R, C, True), g["dequant_nvfp4_bf16"][name][1])
        key = f"{name}.nvfp4_rows_unpadded.weight"
        if key in g["variants"]:
            qu, bu = nvfp4_quant(xf, s2, pad_rows=False)
            same(f"{name} nvfp4 unpadded weight", qu, g["variants"][key][1])
            same(f"{name} nvfp4 unpadded scale", bu, g["variants"][f"{name}.nvfp4_rows_unpadded.weight_scale"][1])
        key = f"{name}.nvfp4_comfyui_layout_scale.weight_scale_2"
        if key in g["variants"]:  # ComfyUI's layout: max|w| / 2688 rounded to the source dtype
            d = g["variants"][key][1]
            amax = np.abs(xf).max()
            if dtype == "BF16":
                sc = bf16_to_f32(f32_to_bf16(F32(amax / F32(2688.0))))
            else:
                sc = F32(np.float16(F32(amax) / F32(2688.0)))
            same(f"{name} nvfp4 ComfyUI-layout scale", np.array(sc, F32), d)
            qc, bc = nvfp4_quant(xf, F32(sc))
            same(f"{name} nvfp4 ComfyUI-layout weight", qc, g["variants"][f"{name}.nvfp4_comfyui_layout_scale.weight"][1])
            same(f"{name} nvfp4 ComfyUI-layout scale grid", bc, g["variants"][f"{name}.nvfp4_comfyui_layout_scale.weight_scale"][1])

        q8, bs8 = mxfp8_quant(xf)
        same(f"{name} mxfp8 weight", q8, g["mxfp8"][f"{name}.weight"][1])
        same(f"{name} mxfp8 weight_scale", bs8, g["mxfp8"][f"{name}.weight_scale"][1])
        same(f"{name} mxfp8 dequant f32", mxfp8_dequant(q8, bs8, R, C, False), g["dequant_mxfp8"][name][1])
        same(f"{name} mxfp8 dequant bf16", mxfp8_dequant(q8, bs8, R, C, True), g["dequant_mxfp8_bf16"][name][1])
        key = f"{name}.mxfp8_rows_unpadded.weight"
        if key in g["variants"]:
            qu, bu = mxfp8_quant(xf, pad_rows=False)
            same(f"{name} mxfp8 unpadded weight", qu, g["variants"][key][1])
            same(f"{name} mxfp8 unpadded scale", bu, g["variants"][f"{name}.mxfp8_rows_unpadded.weight_scale"][1])

        for fmt, fj in [("fp8_scaled", "float8_e4m3fn"), ("nvfp4", "nvfp4"), ("mxfp8", "mxfp8")]:
            same(f"{name} {fmt} comfy_quant", np.frombuffer(json.dumps({"format": fj}).encode(), np.uint8),
                 g[fmt][f"{name}.comfy_quant"][1])

    print(f"{checks} comparisons, {len(fails)} failed")
    for f in fails:
        print("  FAIL", f)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
