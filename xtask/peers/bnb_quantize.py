"""bitsandbytes' own 4-bit quantization on CPU, as a benchmark peer.

usage: bnb_quantize.py SRC DST [nf4|fp4]

Every Linear weight (2-D `*.weight`) goes through `bitsandbytes.functional.quantize_4bit`
(blocksize 64, no double quantization) and is stored with its packed quant state
(`QuantState.as_dict(packed=True)`), the layout `Params4bit.from_prequantized` loads. Other
tensors are kept in bf16 (f32 sources) or their own 16-bit dtype.
"""

import sys

import torch
import bitsandbytes.functional as bnbf
from safetensors.torch import load_file, save_file


def main() -> None:
    src, dst = sys.argv[1:3]
    quant_type = sys.argv[3] if len(sys.argv) > 3 else "nf4"
    tensors = load_file(src)
    out = {}
    for name, t in tensors.items():
        keep = torch.bfloat16 if t.dtype == torch.float32 else t.dtype
        if name.endswith(".weight") and t.dim() == 2 and t.is_floating_point():
            packed, state = bnbf.quantize_4bit(
                t.to(keep), blocksize=64, quant_type=quant_type, compress_statistics=False
            )
            out[name] = packed
            for k, v in state.as_dict(packed=True).items():
                out[f"{name}.{k}"] = v
        else:
            out[name] = t.to(keep) if t.is_floating_point() else t
    save_file(out, dst)


if __name__ == "__main__":
    main()
