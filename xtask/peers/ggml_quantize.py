"""The second step of ComfyUI-GGUF's path (its patched llama-quantize), as a benchmark peer.

usage: ggml_quantize.py BASE_GGUF DST TARGET [THREADS]   (TARGET: Q8_0 | Q4_K_M)

Reads the F16/BF16 base GGUF that `gguf_base_step.py` writes and re-types its tensors as
llama-quantize with ComfyUI-GGUF's `tools/lcpp.patch` does for a Flux model: which tensors may
be quantized and the Q4_K_M per-tensor upgrades are the patch's rules (transcribed for Flux; the
full transcription for every architecture is `crates/gguf/tests/golden/convert/make_goldens.py`).
The bytes come from ggml itself: each tensor widened to f32, then `ggml_quantize_chunk` (no
importance matrix) from the `libggml-base.so` of pip llama-cpp-python, its rows split into
THREADS contiguous chunks quantized in parallel (ctypes releases the GIL), as llama-quantize
splits rows over its threads. Like llama-quantize it streams: one tensor in memory at a time,
tensors written in name order (its loader's map order). THREADS defaults to the CPU count.
"""

import ctypes
import glob
import os
import sys
import threading

import gguf
import numpy as np

# lcpp.patch, Flux: names containing these are never quantized.
FLUX_NO_QUANT = ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
# lcpp.patch's img_tensor_get_type for Q4_K_M: V projections -> Q6_K, fused QKV -> Q5_K,
# second FFN layers -> Q6_K (Flux's names match none of the V / QKV patterns but the list is
# kept so other layouts get the same treatment).
V_NAMES = ("attn_v.weight", ".to_v.weight", ".v.weight", ".attn.w1v.weight", ".attn.w2v.weight",
           "_attn.v_proj.weight")
QKV_NAMES = ("attn_qkv.weight", "attn.qkv.weight", "attention.qkv.weight")
FFN_NAMES = ("ffn_down", ".ffn.2.weight", ".ff.net.2.weight", ".mlp.layer2.weight",
             ".adaln_modulation_mlp.2.weight", ".feed_forward.w2.weight")
FILE_TYPE = {"Q8_0": 7, "Q4_K_M": 15}
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def find_lib():
    for p in sys.path:
        hits = glob.glob(os.path.join(p, "llama_cpp", "**", "libggml-base.so*"), recursive=True)
        if hits:
            return hits[0]
    sys.exit("libggml-base.so not found: pip install llama-cpp-python")


def n_dims(shape):
    n = len(shape)
    while n > 1 and shape[n - 1] == 1:
        n -= 1
    return n


def target_type(name, shape, target):
    """The patched llama-quantize's type for one tensor, or None to keep the base type."""
    if not name.endswith("weight") or n_dims(shape) != 2 or "_norm.weight" in name:
        return None
    if any(s in name for s in FLUX_NO_QUANT):
        return None
    if target == "Q8_0":
        new = "Q8_0"
    else:
        new = "Q4_K"
        if any(p in name for p in V_NAMES) or any(p in name for p in FFN_NAMES):
            new = "Q6_K"
        elif any(p in name for p in QKV_NAMES):
            new = "Q5_K"
        if new in K_QUANTS and shape[0] % 256 != 0:
            new = "F16"
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[new]][0]
    return new if shape[0] % block == 0 else None


def to_f32(data, qtype):
    raw = np.ascontiguousarray(data).view(np.uint8)
    if qtype == gguf.GGMLQuantizationType.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return raw.view(np.float16).astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F32:
        return raw.view(np.float32)
    return gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(-1)


def main():
    src, dst, target = sys.argv[1:4]
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else (os.cpu_count() or 1)
    lib = ctypes.CDLL(find_lib())
    chunk = lib.ggml_quantize_chunk
    chunk.restype = ctypes.c_size_t
    chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                      ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(path=None, arch=str(reader.get_field("general.architecture").contents()))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(FILE_TYPE[target])

    plan = []
    for t in sorted(reader.tensors, key=lambda t: t.name.encode()):
        shape = [int(d) for d in t.shape]  # ggml order: shape[0] is the row length
        new = target_type(t.name, shape, target)
        qt = gguf.GGMLQuantizationType[new] if new else t.tensor_type
        if qt == t.tensor_type:
            qt, new = t.tensor_type, None
        bs, ts = gguf.GGML_QUANT_SIZES[qt]
        n = int(np.prod(shape))
        nbytes = n // bs * ts
        byte_shape = list(reversed(shape))
        byte_shape[-1] = shape[0] // bs * ts
        writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qt)
        plan.append((t, new, qt, shape, n, nbytes))

    writer.write_header_to_file(path=dst)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t, new, qt, shape, n, nbytes in plan:
        if new is None:
            writer.write_tensor_data(np.ascontiguousarray(t.data).view(np.uint8).reshape(-1))
            continue
        x = np.ascontiguousarray(to_f32(t.data, t.tensor_type).reshape(-1))
        out = np.empty(nbytes, dtype=np.uint8)
        row = shape[0]
        rows = n // row
        per = (rows + threads - 1) // threads
        ranges = [(r, min(per, rows - r)) for r in range(0, rows, per)]

        def work(first, count):
            chunk(int(qt), x.ctypes.data, out.ctypes.data, first * row, count, row, None)

        pool = [threading.Thread(target=work, args=r) for r in ranges[1:]]
        for th in pool:
            th.start()
        work(*ranges[0])
        for th in pool:
            th.join()
        writer.write_tensor_data(out)
    writer.close()


if __name__ == "__main__":
    main()
