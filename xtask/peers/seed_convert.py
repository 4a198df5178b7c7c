"""The seed's precision path, as a benchmark peer.

usage: seed_convert.py SRC DST DTYPE [--fsync]   (DTYPE: fp16 | bf16 | fp8_e4m3fn)

What the original tool did: load the whole file with safetensors.torch, cast every floating
tensor with `.to(dtype)`, save with safetensors.torch. The whole model sits in memory.

With --fsync the output and its directory are fsynced before exiting: the durability of
convcache's default mode, for a like-with-like comparison (the seed itself did not fsync).
"""

import os
import sys

import torch
from safetensors.torch import load_file, save_file

DTYPES = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8_e4m3fn": torch.float8_e4m3fn,
}


def main() -> None:
    src, dst, name = sys.argv[1:4]
    fsync = sys.argv[4:] == ["--fsync"]
    if sys.argv[4:] and not fsync:
        sys.exit(f"seed_convert.py: unknown arguments {sys.argv[4:]}")
    dtype = DTYPES[name]
    tensors = load_file(src)
    out = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    save_file(out, dst, metadata={"format": "pt"})
    if fsync:
        for path, flags in ((dst, os.O_RDONLY), (os.path.dirname(os.path.abspath(dst)), os.O_RDONLY)):
            fd = os.open(path, flags)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


if __name__ == "__main__":
    main()
