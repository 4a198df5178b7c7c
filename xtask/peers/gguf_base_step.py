"""The first step of ComfyUI-GGUF's path (tools/convert.py), as a benchmark peer.

usage: gguf_base_step.py SRC DST ARCH

Writes the F16/BF16 "base" GGUF that ggml's quantizer then reads: per tensor, BF16 if the
source tensor is BF16, otherwise F16; F32 for 1-D tensors and tensors of at most 1024
elements when the source is F32 or BF16. Metadata: general.architecture, quantization
version 2, general.file_type (BF16 = 32 if BF16 tensors dominate, else F16 = 1). Written
with pip `gguf`; like convert.py it holds every converted tensor until the file is written.
"""

import sys
from collections import Counter

import gguf
import numpy as np
import torch
from safetensors import safe_open

SMALL = 1024


def main() -> None:
    src, dst, arch = sys.argv[1:4]
    writer = gguf.GGUFWriter(path=None, arch=arch)
    dtypes = Counter()
    with safe_open(src, framework="pt") as f:
        keys = list(f.keys())
        for key in keys:
            dtypes[f.get_slice(key).get_dtype()] += 1
        main_bf16 = dtypes.most_common(1)[0][0] == "BF16"
        for key in keys:
            t = f.get_tensor(key)
            src_dtype = t.dtype
            if src_dtype == torch.bfloat16:
                data = t.to(torch.float32).numpy()
                qtype = gguf.GGMLQuantizationType.BF16
            elif src_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                data = t.to(torch.float16).numpy()
                qtype = gguf.GGMLQuantizationType.F16
            else:
                data = t.numpy()
                qtype = gguf.GGMLQuantizationType.F16
            if src_dtype in (torch.float32, torch.bfloat16) and (
                data.ndim == 1 or data.size <= SMALL
            ):
                qtype = gguf.GGMLQuantizationType.F32
            packed = gguf.quants.quantize(data.astype(np.float32, copy=False), qtype)
            writer.add_tensor(key, packed, raw_dtype=qtype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(
        gguf.LlamaFileType.MOSTLY_BF16 if main_bf16 else gguf.LlamaFileType.MOSTLY_F16
    )
    writer.write_header_to_file(path=dst)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


if __name__ == "__main__":
    main()
