"""Golden files for the detect tests, written by the reference tools.

Run with a Python that has torch, safetensors and bitsandbytes (the project uses the venv
/work/pyref: `/work/pyref/bin/python crates/detect/tests/golden/make_goldens.py`). Writes into
this directory:

- mixed_dtypes.safetensors: safetensors.torch.save_file with every dtype convcache reads, a
  scalar and an empty tensor, and __metadata__; mixed_dtypes.json: what safetensors itself
  reports for it (metadata; per tensor dtype, shape, data_offsets from the raw header).
- bnb_nf4.safetensors, bnb_nf4_dq.safetensors, bnb_fp4.safetensors, bnb_int8.safetensors: the
  state dicts bitsandbytes' own Linear4bit (quant_type nf4/fp4, compress_statistics off/on) and
  Linear8bitLt save, quantized on CPU.

The files are a few KB; tests only read them.
"""

import json
import os
import struct

import bitsandbytes as bnb
import torch
from safetensors import safe_open
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))


def raw_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def mixed():
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.diffusion_model.norm.scale": torch.randn(16, generator=g),
        "model.diffusion_model.w_bf16": torch.randn(32, 16, generator=g).to(torch.bfloat16),
        "w_f16": torch.randn(8, 4, generator=g).to(torch.float16),
        "w_e4m3": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "w_e5m2": torch.randn(4, 2, generator=g).to(torch.float8_e5m2),
        "ids": torch.arange(6, dtype=torch.int64),
        "q": torch.arange(-4, 4, dtype=torch.int8),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 3),
    }
    path = os.path.join(HERE, "mixed_dtypes.safetensors")
    save_file(tensors, path, metadata={"format": "pt", "title": "golden ✓"})
    header = raw_header(path)
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
        keys = sorted(f.keys())
    expected = {
        "metadata": metadata,
        "file_size": os.path.getsize(path),
        "tensors": {
            k: {
                "dtype": header[k]["dtype"],
                "shape": header[k]["shape"],
                "data_offsets": header[k]["data_offsets"],
            }
            for k in keys
        },
    }
    with open(os.path.join(HERE, "mixed_dtypes.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def save_module(module, name):
    sd = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(sd, os.path.join(HERE, name))


def bnb4(quant_type, compress, name):
    torch.manual_seed(0)
    lin = bnb.nn.Linear4bit(
        64, 64, bias=True, compute_dtype=torch.bfloat16,
        compress_statistics=compress, quant_type=quant_type,
    )
    lin.load_state_dict(torch.nn.Linear(64, 64).state_dict())
    lin = lin.to("cpu")  # quantizes
    lin.weight.data  # noqa: B018  (force materialisation)
    model = torch.nn.Module()
    model.layer = lin
    save_module(model, name)


def bnb8(name):
    torch.manual_seed(0)
    lin = bnb.nn.Linear8bitLt(64, 64, bias=True, has_fp16_weights=False)
    lin.load_state_dict(torch.nn.Linear(64, 64).half().state_dict())
    lin = lin.to("cpu")
    model = torch.nn.Module()
    model.layer = lin
    save_module(model, name)


if __name__ == "__main__":
    mixed()
    bnb4("nf4", False, "bnb_nf4.safetensors")
    bnb4("nf4", True, "bnb_nf4_dq.safetensors")
    bnb4("fp4", False, "bnb_fp4.safetensors")
    bnb8("bnb_int8.safetensors")
