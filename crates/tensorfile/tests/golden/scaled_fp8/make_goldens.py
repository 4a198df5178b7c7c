#!/usr/bin/env python3
"""Golden files for de-scaling ComfyUI scaled-fp8 checkpoints.

How to run (needs torch >= 2.1 and safetensors >= 0.4; numpy is not used):

    python make_goldens.py            # writes next to this script
    python make_goldens.py --out DIR  # writes into DIR

The script is deterministic (fixed seeds, a pure-Python RNG, fp8 weights built
from raw bit patterns), so re-running it with the same torch/safetensors
versions rewrites byte-identical files. It re-reads every file it wrote and
checks it, then prints a summary.

What it writes:

  legacy_source.safetensors
      The legacy "fp8_scaled" layout: an empty marker `scaled_fp8` (shape [0],
      F8_E4M3), three quantized Linear layers `<layer>.weight` (F8_E4M3) with
      `<layer>.scale_weight` (F32, shape [] or [1]), one `<layer>.scale_input`
      (F32 scalar), and unquantized BF16 tensors (a bias, a norm scale and a
      2-D weight without a scale).
  comfy_quant_source.safetensors
      ComfyUI's mixed-precision layout: per quantized layer `<layer>.weight`
      (F8_E4M3 or F8_E5M2), `<layer>.weight_scale` (F32 scalar), one
      `<layer>.input_scale`, and `<layer>.comfy_quant` (U8 bytes of
      json.dumps({"format": ...}), as ComfyUI writes it), plus the same BF16
      tensors.
  comfy_quant_metadata_source.safetensors
      The same tensors without any `.comfy_quant` tensor; instead the header's
      __metadata__ has `_quantization_metadata` =
      json.dumps({"format_version": "1.0", "layers": {<layer>: {"format": ...}}}).
  expected_legacy_{fp32,fp16,bf16}.safetensors
  expected_comfy_quant_{fp32,fp16,bf16}.safetensors
      For each target dtype T: every de-scaled weight as
          (w.to(torch.float32) * scale).to(T)
      and every other tensor as t.to(T). Scales, input scales, the marker and
      comfy_quant tensors are absent. The comfy_quant expectations hold for
      both comfy_quant_source and comfy_quant_metadata_source.

The scales are chosen to make the products interesting: 0.02989705... (an f32
near 0.03) makes 34 e4m3 codes round differently to fp16 through the f32
product than by a single rounding of the exact product; 0.01716496... does
the same for 30 codes in bf16; 1e-4 pushes products into fp16 subnormals; the
e5m2 layer's scale 1.5 makes its largest products overflow fp16 to +-inf.
Every weight holds every finite code of its fp8 type (both zeros, the
subnormals, +-max) at least once and no NaN or inf.
"""

import argparse
import hashlib
import json
import os
import random
import struct

import safetensors
import torch
from safetensors.torch import load_file, save_file

SEED = 20260105
TARGETS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (layer, shape, scale, scale shape in the legacy file)
E4M3_LAYERS = [
    ("double_blocks.0.img_attn.qkv", (64, 96), 0.0298970527946949, ()),
    ("double_blocks.0.img_mlp.0", (32, 64), 1e-4, (1,)),
    ("single_blocks.0.linear1", (48, 32), 0.017164964228868484, ()),
]
E5M2_LAYER = ("single_blocks.0.linear2", (16, 48), 1.5)
INPUT_SCALE_LAYER = "double_blocks.0.img_attn.qkv"
INPUT_SCALE = 0.75


def finite_codes(dtype):
    """All byte patterns of an fp8 dtype that decode to a finite value."""
    all_bytes = torch.arange(256, dtype=torch.uint8).view(dtype).to(torch.float32)
    return [c for c in range(256) if torch.isfinite(all_bytes[c]).item()]


def fp8_weight(rng, shape, dtype):
    """Every finite code once, the rest uniform over finite codes, shuffled."""
    codes = finite_codes(dtype)
    n = shape[0] * shape[1]
    assert n >= len(codes)
    data = codes + [rng.choice(codes) for _ in range(n - len(codes))]
    rng.shuffle(data)
    return torch.tensor(data, dtype=torch.uint8).view(dtype).reshape(shape)


def bf16_tensor(values):
    # float32 -> bfloat16 is torch's round-to-nearest-even cast.
    return torch.tensor(values, dtype=torch.float32).to(torch.bfloat16)


def unquantized_tensors(rng):
    # Edge values for the bf16 -> fp16 cast: overflow to inf (70000, 65504 which
    # is 65536 in bf16), fp16 subnormals (1e-6, 3e-8), underflow to 0 (1e-9),
    # a bf16 subnormal (1e-40), signed zero.
    edge = [0.0, -0.0, 1.0, -2.5, 70000.0, 65504.0, -1e-6, 3e-8, 1e-9, 1e-40]
    bias = edge + [rng.gauss(0.0, 0.02) for _ in range(64 - len(edge))]
    norm = [1.0 + rng.gauss(0.0, 0.1) for _ in range(32)]
    img_in = [[rng.gauss(0.0, 0.05) for _ in range(16)] for _ in range(32)]
    return {
        "double_blocks.0.img_attn.qkv.bias": bf16_tensor(bias),
        "double_blocks.0.img_attn.norm.query_norm.scale": bf16_tensor(norm),
        "img_in.weight": bf16_tensor(img_in),
    }


def scalar(value, shape=()):
    return torch.tensor(value, dtype=torch.float32).reshape(shape)


def build_sources():
    rng = random.Random(SEED)
    quant = []  # (layer, fp8 weight, f32 scale tensor as stored in the comfy_quant file)
    legacy = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for layer, shape, scale, legacy_shape in E4M3_LAYERS:
        w = fp8_weight(rng, shape, torch.float8_e4m3fn)
        legacy[f"{layer}.weight"] = w
        legacy[f"{layer}.scale_weight"] = scalar(scale, legacy_shape)
        quant.append((layer, w, scalar(scale)))
    legacy[f"{INPUT_SCALE_LAYER}.scale_input"] = scalar(INPUT_SCALE)

    layer, shape, scale = E5M2_LAYER
    quant.append((layer, fp8_weight(rng, shape, torch.float8_e5m2), scalar(scale)))

    plain = unquantized_tensors(rng)
    legacy.update(plain)

    comfy = dict(plain)
    layers_meta = {}
    for layer, w, s in quant:
        fmt = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}[w.dtype]
        comfy[f"{layer}.weight"] = w
        comfy[f"{layer}.weight_scale"] = s
        layers_meta[layer] = {"format": fmt}
    comfy[f"{INPUT_SCALE_LAYER}.input_scale"] = scalar(INPUT_SCALE)

    comfy_meta_only = dict(comfy)
    for layer, conf in layers_meta.items():
        # Same encoding as ComfyUI (comfy/utils.py convert_old_quants, comfy/ops.py state_dict).
        comfy[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers_meta})}
    return legacy, comfy, comfy_meta_only, metadata


def expected(source, scale_suffix, drop_suffixes, target):
    out = {}
    for key, t in source.items():
        if key == "scaled_fp8" or key.endswith(drop_suffixes) or key.endswith(scale_suffix):
            continue
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        scale_key = f"{layer}{scale_suffix}" if layer is not None else None
        if scale_key in source:
            out[key] = (t.to(torch.float32) * source[scale_key]).to(target)
        else:
            out[key] = t.to(target)
    return out


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    )


def differing_bits(a, b):
    """Number of elements whose bit patterns differ (so -0.0 != +0.0)."""
    int_type = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return int((a.view(int_type) != b.view(int_type)).sum())


def f64_single_rounding(w, scale, target):
    """Exact product (f64 is exact for fp8 * f32) rounded once to the target."""
    exact = w.to(torch.float64) * scale.to(torch.float64)
    if target == torch.float16:
        # torch's f64 -> f16 cast goes through f32; CPython's pack rounds once.
        out = bytearray()
        for x in exact.flatten().tolist():
            try:
                out += struct.pack("<e", x)
            except OverflowError:
                out += struct.pack("<e", float("inf") if x > 0 else float("-inf"))
        return torch.frombuffer(out, dtype=torch.float16).reshape(exact.shape)
    if target == torch.bfloat16:
        bits = exact.view(torch.int64)
        lsb = (bits >> 45) & 1
        bits = ((bits + (1 << 44) - 1 + lsb) >> 45) << 45
        return bits.view(torch.float64).to(torch.float32).to(torch.bfloat16)  # exact casts now
    return exact.to(target)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    legacy, comfy, comfy_meta_only, metadata = build_sources()
    files = {
        "legacy_source.safetensors": (legacy, None),
        "comfy_quant_source.safetensors": (comfy, None),
        "comfy_quant_metadata_source.safetensors": (comfy_meta_only, metadata),
    }
    for name, dtype in TARGETS.items():
        files[f"expected_legacy_{name}.safetensors"] = (
            expected(legacy, ".scale_weight", (".scale_input",), dtype), None)
        files[f"expected_comfy_quant_{name}.safetensors"] = (
            expected(comfy, ".weight_scale", (".input_scale", ".comfy_quant"), dtype), None)

    for name, (tensors, meta) in files.items():
        path = os.path.join(args.out, name)
        save_file(tensors, path, metadata=meta)
        back = load_file(path)
        assert back.keys() == tensors.keys(), name
        assert all(same_bits(back[k], tensors[k]) for k in tensors), name
        with safetensors.safe_open(path, "pt") as f:
            assert f.metadata() == meta or (meta is None and not f.metadata()), name
        size = os.path.getsize(path)
        assert size < 100_000, (name, size)
        digest = hashlib.sha256(open(path, "rb").read()).hexdigest()[:16]
        print(f"{name:45s} {size:6d} bytes  sha256 {digest}  {len(tensors)} tensors")

    # Same weights and scales in both layouts: the expectations must agree.
    for name in TARGETS:
        a = load_file(os.path.join(args.out, f"expected_legacy_{name}.safetensors"))
        b = load_file(os.path.join(args.out, f"expected_comfy_quant_{name}.safetensors"))
        assert all(same_bits(a[k], b[k]) for k in a), name

    print(f"torch {torch.__version__}, safetensors {safetensors.__version__}")
    print("elements whose bits differ from other ways of de-scaling (E = f64 exact product rounded once,")
    print("A = w.to(T) * scale, K = w.to(T) * scale.to(T) as comfy-kitchen's eager backend does):")
    for layer, _, scale, *_ in E4M3_LAYERS + [E5M2_LAYER]:
        w = comfy[f"{layer}.weight"]
        s = comfy[f"{layer}.weight_scale"]
        for name, dtype in TARGETS.items():
            golden = (w.to(torch.float32) * s).to(dtype)
            n_e = differing_bits(golden, f64_single_rounding(w, s, dtype))
            n_a = differing_bits(golden, w.to(dtype) * s)
            n_k = differing_bits(golden, w.to(dtype) * s.to(dtype))
            n_inf = int(golden.isinf().sum())
            print(f"  {layer:30s} {scale!r:22} {name}: E {n_e:4d}  A {n_a:4d}  K {n_k:4d}  inf {n_inf}")


if __name__ == "__main__":
    main()
