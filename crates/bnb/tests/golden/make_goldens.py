"""Golden outputs of pip bitsandbytes (CPU) for the `bnb` crate's tests.

Run from anywhere with a venv holding bitsandbytes 0.50.2, torch and safetensors (the project uses
/work/pyref/bin/python):

    /work/pyref/bin/python crates/bnb/tests/golden/make_goldens.py

Writes, next to this script:
- kernels.safetensors: deterministic inputs (f32/f16/bf16; zero blocks, a zero tail block, partial
  final blocks, odd lengths, outliers, exact midpoint ties) and what bitsandbytes makes of them:
  `quantize_4bit` (nf4/fp4, blocksize 64, compress_statistics False/True) packed codes, absmax,
  the `QuantState.as_dict(packed=True)` tensors, `dequantize_4bit` outputs; `int8_vectorwise_quant`
  of the fp16 weight (what `Int8Params` does) and `int8_vectorwise_dequant`.
  Key scheme: `in.<case>.<dtype>` inputs; `q.<case>.<dtype>.<qt>.<plain|dq>.<as_dict key>` and
  `q....dequant` outputs; `i8.<case>.<dtype>.{CB,SCB,dequant}`.
- model_src.safetensors: a tiny flux-like bf16 model (Linear weights incl. embedders, biases, an
  RMSNorm scale, a 4-D conv, a token embedding, an int tensor).
- model_{nf4,nf4_dq,fp4,int8}.safetensors: that model with every Linear weight quantized the way
  Forge does it (`Linear4bit` / `Linear8bitLt` state dicts), everything else unchanged.
- float_repr.json: `json.dumps` of f32 values widened to float, as bnb prints `nested_offset`.
- model_{nf4_dq,int8}_dequant.safetensors: bnb's dequantization (`QuantState.from_dict` +
  `dequantize_4bit`; `int8_vectorwise_dequant` -> bf16) of those files' quantized weights.
"""

import json
import os

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch
from safetensors.torch import save_file

assert bnb.__version__.startswith("0.50"), bnb.__version__
HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def cases():
    g = torch.Generator().manual_seed(1234)
    out = {}
    # Outliers and a zero 64-block; last dim a multiple of 64 (native CPU dequant path).
    a = torch.randn(8, 192, generator=g) * 0.05
    a[1, 5] = 3.0
    a[4, 100] = -7.5
    a[2, 64:128] = 0.0
    out["rand"] = a
    # Odd length, partial final block (259 = 4*64 + 3).
    out["odd"] = torch.randn(7, 37, generator=g) * 2.0
    # A zero tail block (130 = 2*64 + 2 zeros).
    z = torch.randn(1, 130, generator=g)
    z[0, 128:] = 0.0
    out["zerotail"] = z
    # Exact ties: absmax 1.0, values equal to the NF4 / FP4 f32 midpoints and their neighbours.
    nf4 = F.get_4bit_type("nf4", device="cpu").float()
    fp4 = torch.sort(F.get_4bit_type("fp4", device="cpu").float())[0]
    mids = torch.cat([(nf4[:-1] + nf4[1:]) / 2, (fp4[:-1] + fp4[1:]) / 2])
    up = torch.nextafter(mids, torch.tensor(2.0))
    dn = torch.nextafter(mids, torch.tensor(-2.0))
    t = torch.cat([torch.tensor([1.0, -1.0, 0.0, -0.0]), mids, up, dn, -mids])
    t = torch.cat([t, torch.zeros((-t.numel()) % 64)])
    out["ties"] = t.reshape(-1, 64)
    # Non-finite values: a NaN block, +inf and -inf blocks.
    nf = torch.randn(3, 64, generator=g)
    nf[0, 3] = float("nan")
    nf[1, 6] = float("inf")
    nf[2, 10] = -float("inf")
    out["nonfinite"] = nf
    # Many 64-blocks: 264 blocks -> two nested 256-blocks (one partial) for double quant.
    out["big"] = torch.randn(24, 704, generator=g) * torch.linspace(0.001, 0.2, 24).unsqueeze(1)
    return out


def int8_cases():
    g = torch.Generator().manual_seed(99)
    a = torch.randn(6, 96, generator=g) * 0.1
    a[1] = 0.0  # zero row
    a[3, 7] = 12.0  # outlier
    # Exact .5 ties: with absmax 127, x*127/127 = x; choose x = k + 0.5.
    a[4, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5])
    b = torch.randn(3, 16, generator=g)
    b[0, 2] = float("nan")
    b[1, 5] = float("inf")
    return {"rows": a, "rows_nonfinite": b}


def main():
    torch.manual_seed(0)
    t = {}
    for name, base in cases().items():
        dts = ["bf16"] if name == "big" else list(DTYPES)
        for dn in dts:
            x = base.to(DTYPES[dn]).contiguous()
            t[f"in.{name}.{dn}"] = x
            for qt in ("nf4", "fp4"):
                for cs in (False, True):
                    if cs and name not in ("big", "rand", "odd"):
                        continue
                    q, st = F.quantize_4bit(x, blocksize=64, quant_type=qt, compress_statistics=cs)
                    key = f"q.{name}.{dn}.{qt}.{'dq' if cs else 'plain'}"
                    t[f"{key}.weight"] = q
                    for k, v in st.as_dict(packed=True).items():
                        t[f"{key}.{k}"] = v
                    if cs:
                        # the f32 absmax before double quant, to test the nested quantizer alone
                        _, st_plain = F.quantize_4bit(x, blocksize=64, quant_type=qt, compress_statistics=False)
                        t[f"{key}.raw_absmax"] = st_plain.absmax
                        t[f"{key}.offset"] = st.offset.reshape(1)
                    if name != "big" or (qt, cs) == ("nf4", True):
                        t[f"{key}.dequant"] = F.dequantize_4bit(q, st)
    for name, base in int8_cases().items():
        for dn in DTYPES:
            x = base.to(DTYPES[dn])
            t[f"in.{name}.{dn}"] = x.contiguous()
            CB, SCB, _ = F.int8_vectorwise_quant(x.to(torch.float16).contiguous())
            t[f"i8.{name}.{dn}.CB"] = CB
            t[f"i8.{name}.{dn}.SCB"] = SCB
            t[f"i8.{name}.{dn}.dequant"] = F.int8_vectorwise_dequant(CB, SCB)
    t = {k: v.contiguous().clone() for k, v in t.items()}
    save_file(t, os.path.join(HERE, "kernels.safetensors"), metadata={"bitsandbytes": bnb.__version__})
    # The 256-entry dynamic map bnb stores as nested_quant_map, as hex f32 bits for the Rust source.
    dyn = F.create_dynamic_map().float()
    with open(os.path.join(HERE, "dynamic_map.json"), "w") as f:
        json.dump([f"{v & 0xFFFFFFFF:08x}" for v in dyn.view(torch.int32).tolist()], f)
        f.write("\n")
    fp4 = F.get_4bit_type("fp4", device="cpu").float()
    print("fp4 argsort order:", torch.argsort(fp4).tolist())
    # How json.dumps prints f32 values widened to float (the nested_offset field), across
    # magnitudes: [f32 bits, text].
    g = torch.Generator().manual_seed(5)
    vals = torch.cat([
        torch.randn(200, generator=g) * torch.logspace(-30, 30, 200),
        torch.tensor([1e-5, 1e-4, 1.5e-4, 9.9999e-5, 1e16, 1e15, 123456789.0, 2.0, 0.5, 1e-38, 3.4e38]),
        # Typical nested offsets (absmax means): f32 values whose shortest repr has an exact
        # tie, which Python breaks to even (0.063327789306640625 -> "...062").
        torch.tensor([0.063327789306640625]),
        torch.rand(2000, generator=g) * 0.2,
    ]).float()
    with open(os.path.join(HERE, "float_repr.json"), "w") as f:
        json.dump([[v & 0xFFFFFFFF, json.dumps(x)] for v, x in zip(vals.view(torch.int32).tolist(), vals.tolist())], f)
        f.write("\n")
    model()


LINEARS = {
    "model.diffusion_model.img_in": (64, 64),
    "model.diffusion_model.time_in.in_layer": (64, 128),
    "model.diffusion_model.double_blocks.0.img_attn.qkv": (192, 64),
    "model.diffusion_model.final_layer.linear": (64, 64),
}


def model():
    g = torch.Generator().manual_seed(7)
    src = {}
    for p, (o, i) in LINEARS.items():
        w = torch.randn(o, i, generator=g) * 0.05
        w[0, :64] = 0.0  # a zero block
        src[p + ".weight"] = w.to(torch.bfloat16)
        src[p + ".bias"] = (torch.randn(o, generator=g) * 0.1).to(torch.bfloat16)
    src["model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale"] = torch.rand(32, generator=g).to(torch.bfloat16)
    src["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 4, 3, 3, generator=g).to(torch.bfloat16)
    src["first_stage_model.decoder.conv_in.bias"] = torch.randn(8, generator=g).to(torch.bfloat16)
    emb = "text_encoders.clip_l.transformer.text_model.embeddings"
    src[emb + ".token_embedding.weight"] = torch.randn(50, 32, generator=g).to(torch.bfloat16)
    src[emb + ".position_ids"] = torch.arange(10, dtype=torch.int64).reshape(1, 10)
    save_file(src, os.path.join(HERE, "model_src.safetensors"))

    for variant, qt, cs in (("nf4", "nf4", False), ("nf4_dq", "nf4", True), ("fp4", "fp4", False)):
        out = {k: v for k, v in src.items() if not any(k.startswith(p + ".") for p in LINEARS)}
        for p, (o, i) in LINEARS.items():
            lin = bnb.nn.Linear4bit(i, o, bias=True, compute_dtype=torch.bfloat16, compress_statistics=cs,
                                    quant_type=qt, device="meta")
            lin.weight = bnb.nn.Params4bit(src[p + ".weight"], requires_grad=False, compress_statistics=cs,
                                           quant_type=qt, blocksize=64, module=lin)
            lin.bias = torch.nn.Parameter(src[p + ".bias"], requires_grad=False)
            lin = lin.to("cpu")
            assert lin.weight.bnb_quantized
            for k, v in lin.state_dict(prefix=p + ".").items():
                out[k] = v.detach().contiguous().clone()
        save_file(out, os.path.join(HERE, f"model_{variant}.safetensors"))
        if variant == "nf4_dq":
            # bnb's own dequantization of every quantized weight (dtype from the quant state)
            dq = {}
            for p in LINEARS:
                qs = {k[len(p) + len(".weight."):]: v for k, v in out.items() if k.startswith(p + ".weight.")}
                state = F.QuantState.from_dict(qs, device=torch.device("cpu"))
                dq[p + ".weight"] = F.dequantize_4bit(out[p + ".weight"], state).contiguous()
            save_file(dq, os.path.join(HERE, "model_nf4_dq_dequant.safetensors"))

    out = {k: v for k, v in src.items() if not any(k.startswith(p + ".") for p in LINEARS)}
    for p, (o, i) in LINEARS.items():
        lin = bnb.nn.Linear8bitLt(i, o, bias=True, has_fp16_weights=False)
        lin.weight = bnb.nn.Int8Params(src[p + ".weight"], requires_grad=False, has_fp16_weights=False)
        lin.bias = torch.nn.Parameter(src[p + ".bias"], requires_grad=False)
        lin = lin.to("cpu")
        for k, v in lin.state_dict(prefix=p + ".").items():
            out[k] = v.detach().contiguous().clone()
    save_file(out, os.path.join(HERE, "model_int8.safetensors"))
    dq = {p + ".weight": F.int8_vectorwise_dequant(out[p + ".weight"], out[p + ".SCB"]).to(torch.bfloat16).contiguous()
          for p in LINEARS}
    save_file(dq, os.path.join(HERE, "model_int8_dequant.safetensors"))


if __name__ == "__main__":
    main()
