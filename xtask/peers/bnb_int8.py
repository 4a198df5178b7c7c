"""bitsandbytes' own LLM.int8 quantization on CPU, as a benchmark peer.

usage: bnb_int8.py SRC DST

Every Linear weight (2-D `*.weight`) goes through `bitsandbytes.functional.int8_vectorwise_quant`
on its fp16 copy (what `Linear8bitLt` does when it quantizes a weight) and is stored as the
`Linear8bitLt` state dict stores it: `P.weight` (int8), `P.SCB` (f32 row scales) and
`P.weight_format` (uint8 0). Other tensors are kept in bf16 (f32 sources) or their own 16-bit
dtype. The whole model is loaded first, as a script using safetensors.torch does.
"""

import sys

import torch
import bitsandbytes.functional as bnbf
from safetensors.torch import load_file, save_file


def main() -> None:
    src, dst = sys.argv[1:3]
    tensors = load_file(src)
    out = {}
    for name, t in tensors.items():
        keep = torch.bfloat16 if t.dtype == torch.float32 else t.dtype
        if name.endswith(".weight") and t.dim() == 2 and t.is_floating_point():
            cb, scb, _ = bnbf.int8_vectorwise_quant(t.to(torch.float16))
            prefix = name[: -len("weight")]
            out[name] = cb
            out[prefix + "SCB"] = scb
            out[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)
        else:
            out[name] = t.to(keep) if t.is_floating_point() else t
    save_file(out, dst)


if __name__ == "__main__":
    main()
