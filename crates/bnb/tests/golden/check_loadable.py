"""Loads a convcache bitsandbytes output with bitsandbytes itself (manual check, not CI).

    /work/pyref/bin/python crates/bnb/tests/golden/check_loadable.py OUT.safetensors [SOURCE.safetensors]

For every 4-bit weight: gathers the keys under `P.weight.` as Forge/transformers do, calls
`QuantState.from_dict`, `Params4bit.from_prequantized`, `dequantize_4bit`, and a `Linear4bit`
forward pass on CPU. For every int8 weight: loads the `Linear8bitLt` state dict (weight, SCB,
weight_format) into a module and dequantizes. With SOURCE, reports the worst relative error of
each dequantized weight against the original. Exits non-zero on any failure.
"""

import sys

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch
from safetensors.torch import load_file

out = load_file(sys.argv[1])
src = load_file(sys.argv[2]) if len(sys.argv) > 2 else {}
n4 = n8 = 0
worst = 0.0


def compare(name, w):
    global worst
    if name in src:
        ref = src[name].float()
        err = ((w.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()
        worst = max(worst, err)
        assert err < 0.5, f"{name}: relative error {err}"


for key in sorted(out):
    for qt in ("nf4", "fp4"):
        suffix = f".weight.quant_state.bitsandbytes__{qt}"
        if not key.endswith(suffix):
            continue
        p = key[: -len(suffix)]
        wkey = p + ".weight"
        qs = {k[len(wkey) + 1:]: v for k, v in out.items() if k.startswith(wkey + ".")}
        state = F.QuantState.from_dict(qs, device=torch.device("cpu"))
        assert state.quant_type == qt and state.blocksize == 64
        w = F.dequantize_4bit(out[wkey], state)
        assert tuple(w.shape) == tuple(state.shape) and torch.isfinite(w).all(), p
        compare(wkey, w)
        param = bnb.nn.Params4bit.from_prequantized(out[wkey], {k: v for k, v in qs.items()}, device="cpu")
        o, i = state.shape
        lin = bnb.nn.Linear4bit(i, o, bias=p + ".bias" in out, compute_dtype=state.dtype, quant_type=qt, device="cpu")
        lin.weight = param
        if p + ".bias" in out:
            lin.bias = torch.nn.Parameter(out[p + ".bias"].to(state.dtype), requires_grad=False)
        x = torch.randn(2, i, dtype=state.dtype)
        y = lin(x)
        ref = x.float() @ w.float().t() + (lin.bias.float() if lin.bias is not None else 0)
        assert torch.allclose(y.float(), ref, rtol=0.05, atol=0.05), f"{p}: forward differs"
        n4 += 1
    if key.endswith(".SCB"):
        p = key[: -len(".SCB")]
        w8 = out[p + ".weight"]
        assert w8.dtype == torch.int8
        o, i = w8.shape
        # bnb loads SCB only into an already-quantized module (`.to(device)` quantizes).
        lin = bnb.nn.Linear8bitLt(i, o, bias=p + ".bias" in out, has_fp16_weights=False).to("cpu")
        sd = {"weight": w8, "SCB": out[key], "weight_format": out[p + ".weight_format"]}
        if p + ".bias" in out:
            sd["bias"] = out[p + ".bias"]
        lin.load_state_dict(sd)
        assert torch.equal(lin.weight.data, w8) and torch.equal(lin.weight.SCB, out[key])
        w = F.int8_vectorwise_dequant(lin.weight.data, lin.weight.SCB)
        compare(p + ".weight", w)
        x = torch.randn(2, i, dtype=torch.float16)
        y = lin(x)
        ref = x.float() @ w.float().t() + (lin.bias.float() if lin.bias is not None else 0)
        assert torch.allclose(y.float(), ref, rtol=0.05, atol=0.05), f"{p}: int8 forward differs"
        n8 += 1

print(f"ok: {n4} 4-bit and {n8} int8 weights loaded and dequantized by bitsandbytes {bnb.__version__}"
      + (f"; worst relative error vs source {worst:.4f}" if src else ""))
if n4 + n8 == 0:
    sys.exit("no bitsandbytes weights found")
