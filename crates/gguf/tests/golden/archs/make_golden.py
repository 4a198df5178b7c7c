"""What gguf-py reads in convcache's Q4_K_M outputs of fixtures/archs/.

Converts every fixture with the convcache CLI into a scratch models dir, checks each output
landed in the models folder of its kind (text_encoders/gguf for T5/umt5, else
diffusion_models/gguf), reads it with gguf-py's GGUFReader and writes gguf_py_listing.json:
per fixture, every tensor's [name, type name, torch-order shape] and every metadata key with
its value (convcache.* provenance keys left out: they hold paths and times). For the umt5
fixture it also rebuilds the SentencePiece model from the GGUF's tokenizer.ggml.* keys the way
ComfyUI-GGUF's loader does and checks it equals the source's spiece_model padded to the
token embedding's rows as llama.cpp pads (needs the sentencepiece and protobuf packages), and
checks llama.cpp itself loads that GGUF (llama-cpp-python). For every
T5/umt5 output
it applies the loader's T5_SD_MAP to the GGUF names and checks they give back every key of the
source. The Rust test crates/gguf/tests/new_archs.rs compares convcache's output with this listing.

Run from the repository root, after `cargo build -p cli`:
    /work/bench-venv/bin/python crates/gguf/tests/golden/archs/make_golden.py
"""
import ctypes
import json
import os
import subprocess
import sys
import tempfile

import gguf

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "../../../../.."))
CLI = os.path.join(ROOT, "target/debug/convcache")
FIXTURES = os.path.join(ROOT, "fixtures/archs")
TEXT_ENCODERS = {"t5xxl", "umt5xxl"}
# CLIP gets no GGUF (ComfyUI-GGUF cannot load one).
SKIP = {"clip_l_fp16.safetensors", "clip_g_fp16.safetensors"}


def scalar(t, part):
    if t == gguf.GGUFValueType.STRING:
        return str(bytes(part), encoding="utf-8")
    if t in (gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32):
        return int(part[0])
    if t == gguf.GGUFValueType.FLOAT32:
        return float(part[0])
    if t == gguf.GGUFValueType.BOOL:
        return bool(part[0])
    raise TypeError(f"unexpected type {t}")


def value(field):
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        return [scalar(field.types[1], field.parts[i]) for i in field.data]
    return scalar(field.types[0], field.parts[field.data[-1]])


# ComfyUI-GGUF loader.py's T5_SD_MAP and sd_map_replace, as the loader applies them.
T5_SD_MAP = {
    "enc.": "encoder.",
    ".blk.": ".block.",
    "token_embd": "shared",
    "output_norm": "final_layer_norm",
    "attn_q": "layer.0.SelfAttention.q",
    "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o",
    "attn_norm": "layer.0.layer_norm",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "ffn_up": "layer.1.DenseReluDense.wi_1",
    "ffn_down": "layer.1.DenseReluDense.wo",
    "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_norm": "layer.1.layer_norm",
}


def check_t5_names(reader, src):
    """Every GGUF name maps back, through the loader's map, to a key of the source (all of
    them but the tokenizer bytes)."""
    from safetensors import safe_open

    with safe_open(src, framework="np") as f:
        want = sorted(k for k in f.keys() if k != "spiece_model")
    got = []
    for t in reader.tensors:
        k = t.name
        for a, b in T5_SD_MAP.items():
            k = k.replace(a, b)
        got.append(k)
    assert sorted(got) == want, (sorted(got), want)


def check_tokenizer(path, src):
    """ComfyUI-GGUF's gguf_tokenizer_loader (loader.py), minus its umt5 size check, rebuilds
    the source's SentencePiece model from the GGUF's keys."""
    from safetensors import safe_open
    from sentencepiece import sentencepiece_model_pb2 as model

    orig = model.ModelProto()
    with safe_open(src, framework="np") as f:
        orig.ParseFromString(f.get_tensor("spiece_model").tobytes())
    r = gguf.GGUFReader(path)
    f = lambda k: value(r.fields[k])
    assert f("tokenizer.ggml.model") == "t5"
    spm = model.ModelProto()
    spm.normalizer_spec.add_dummy_prefix = f("tokenizer.ggml.add_space_prefix")
    spm.normalizer_spec.remove_extra_whitespaces = f("tokenizer.ggml.remove_extra_whitespaces")
    for token, score, toktype in zip(f("tokenizer.ggml.tokens"), f("tokenizer.ggml.scores"), f("tokenizer.ggml.token_type")):
        piece = spm.SentencePiece()
        piece.piece = token
        piece.score = score
        piece.type = toktype
        spm.pieces.append(piece)
    spm.trainer_spec.eos_id = f("tokenizer.ggml.eos_token_id")
    spm.trainer_spec.pad_id = f("tokenizer.ggml.padding_token_id")
    # Padded to the token embedding's rows as llama.cpp's convert_hf_to_gguf.py pads
    # (ComfyUI-GGUF keeps the padding pieces; they are UNUSED, so never produced).
    n_vocab = next(int(t.shape[1]) for t in r.tensors if t.name == "token_embd.weight")
    assert len(spm.pieces) == max(n_vocab, len(orig.pieces)), (len(spm.pieces), n_vocab)
    assert list(spm.pieces)[: len(orig.pieces)] == list(orig.pieces), (spm.pieces, orig.pieces)
    for i, p in enumerate(list(spm.pieces)[len(orig.pieces):], start=len(orig.pieces)):
        assert (p.piece, p.score, p.type) == (f"[PAD{i}]", -1000.0, 5), p
    assert spm.trainer_spec.eos_id == orig.trainer_spec.eos_id
    assert spm.trainer_spec.pad_id == orig.trainer_spec.pad_id
    assert spm.normalizer_spec.add_dummy_prefix == orig.normalizer_spec.add_dummy_prefix
    assert spm.normalizer_spec.remove_extra_whitespaces == orig.normalizer_spec.remove_extra_whitespaces
    print(f"{os.path.basename(src)}: tokenizer rebuilt ({len(spm.pieces)} pieces)", file=sys.stderr)


def check_llama_cpp_loads(path):
    """llama.cpp itself (llama-cpp-python) loads the T5 GGUF (hyperparameters, tokenizer padded
    to the embedding, tensor shapes) and makes a context for it. (Encoding is not run: on this
    fixture's tiny quantized dims llama.cpp's encoder crashes on llama-quantize's own output
    too; an F16 output of the fixture encodes.)"""
    import llama_cpp

    # Quiet: llama-cpp-python's default log hook fails to decode some of llama.cpp's lines.
    quiet = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())
    assert model, f"llama.cpp cannot load {path}"
    params = llama_cpp.llama_context_default_params()
    params.embeddings = True
    params.n_ctx = 64
    ctx = llama_cpp.llama_init_from_model(model, params)
    assert ctx, f"llama.cpp cannot make a context for {path}"
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    print(f"{os.path.basename(path)}: llama.cpp loads it", file=sys.stderr)


def main():
    out = {"generator": "crates/gguf/tests/golden/archs/make_golden.py", "files": {}}
    with tempfile.TemporaryDirectory() as models:
        for name in sorted(os.listdir(FIXTURES)):
            if name in SKIP:
                continue
            src = os.path.join(FIXTURES, name)
            res = subprocess.run(
                [CLI, "convert", src, "--to", "Q4_K_M", "--models-dir", models, "--json", "-q"],
                check=True, capture_output=True, text=True,
            )
            doc = json.loads(res.stdout)
            path = doc["results"][0]["path"] if "results" in doc else doc[0]["path"]
            kind = "text_encoders" if name.split("_")[0] in TEXT_ENCODERS else "diffusion_models"
            assert os.path.dirname(path) == os.path.join(models, kind, "gguf"), path
            if name.startswith("umt5"):
                check_tokenizer(path, src)
                check_llama_cpp_loads(path)
            r = gguf.GGUFReader(path)
            if kind == "text_encoders":
                check_t5_names(r, src)
            tensors = [[t.name, t.tensor_type.name, [int(d) for d in reversed(t.shape)]] for t in r.tensors]
            meta = {}
            for k, f in r.fields.items():
                if k.startswith("GGUF.") or k.startswith("convcache."):
                    continue
                meta[k] = value(f)
            out["files"][name] = {"tensors": tensors, "metadata": meta}
            print(name, r.fields["general.architecture"].parts[-1].tobytes().decode(), len(tensors), file=sys.stderr)
    with open(os.path.join(os.path.dirname(__file__), "gguf_py_listing.json"), "w") as f:
        json.dump(out, f, indent=1, sort_keys=False)
        f.write("\n")


if __name__ == "__main__":
    main()
