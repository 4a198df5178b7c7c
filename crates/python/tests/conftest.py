"""Shared fixtures: models written by hand in the safetensors format, and the convcache CLI.

The CLI binary is `$CONVCACHE_BIN`, else target/{debug,release}/convcache of this workspace
(`cargo build -p cli` makes it); the tests compare the package's answers with it.
"""

from __future__ import annotations

import array
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def cli_binary() -> str:
    env = os.environ.get("CONVCACHE_BIN")
    if env:
        return env
    for profile in ("debug", "release"):
        candidate = REPO / "target" / profile / "convcache"
        if candidate.is_file():
            return str(candidate)
    pytest.fail("no convcache binary: run `cargo build -p cli` or set CONVCACHE_BIN")


def cli(*args: str, models_dir: Path | None = None, check: bool = True):
    """Runs the CLI with --json; returns (exit code, parsed stdout, stderr)."""
    argv = [cli_binary(), "--json"]
    if models_dir is not None:
        argv += ["--models-dir", str(models_dir)]
    argv += list(args)
    p = subprocess.run(argv, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"{argv} exited {p.returncode}: {p.stderr}")
    out = json.loads(p.stdout) if p.stdout.strip() else None
    return p.returncode, out, p.stderr


def flux_tensors(hidden: int, blocks: int):
    """(name, shape) of a Flux-like transformer (the key names detection recognises as flux)."""
    h = hidden
    specs = [
        ("img_in.weight", [h, 64]),
        ("img_in.bias", [h]),
        ("time_in.in_layer.weight", [h, 256]),
        ("time_in.in_layer.bias", [h]),
    ]
    for b in range(blocks):
        p = f"double_blocks.{b}"
        specs += [
            (f"{p}.img_attn.qkv.weight", [3 * h, h]),
            (f"{p}.img_attn.qkv.bias", [3 * h]),
            (f"{p}.img_attn.proj.weight", [h, h]),
            (f"{p}.img_attn.norm.query_norm.scale", [h // 2]),
            (f"{p}.img_mlp.0.weight", [4 * h, h]),
            (f"{p}.img_mlp.0.bias", [4 * h]),
            (f"{p}.img_mlp.2.weight", [h, 4 * h]),
        ]
    for b in range(blocks):
        p = f"single_blocks.{b}"
        specs += [
            (f"{p}.linear1.weight", [4 * h, h]),
            (f"{p}.linear1.bias", [4 * h]),
            (f"{p}.norm.key_norm.scale", [h // 2]),
        ]
    specs += [("final_layer.linear.weight", [64, h]), ("final_layer.linear.bias", [64])]
    return specs


# 64 Ki distinct finite f32 values in [-2, 2), repeated to fill tensors.
_PATTERN = array.array("f", ((((i * 2654435761) % 65536) / 16384.0) - 2.0 for i in range(65536))).tobytes()


def write_safetensors(path: Path, specs, dtype: str = "F32") -> Path:
    """Writes an F32 or BF16 safetensors file (the BF16 values are the F32 ones truncated)."""
    width = {"F32": 4, "BF16": 2}[dtype]
    pattern = _PATTERN if dtype == "F32" else b"".join(_PATTERN[i + 2 : i + 4] for i in range(0, len(_PATTERN), 4))
    header = {}
    offset = 0
    for name, shape in specs:
        n = 1
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n * width]}
        offset += n * width
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        left = offset
        while left:
            chunk = pattern[: min(left, len(pattern))]
            f.write(chunk)
            left -= len(chunk)
    return path


@pytest.fixture
def models(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    (d / "diffusion_models").mkdir(parents=True)
    return d


@pytest.fixture
def small_model(models: Path) -> Path:
    """A ~1.5 MB f32 flux-like model in the models dir."""
    return write_safetensors(models / "diffusion_models" / "flux_small.safetensors", flux_tensors(96, 2))


@pytest.fixture(scope="session")
def big_model(tmp_path_factory) -> Path:
    """A ~200 MB f32 flux-like model: conversions of it take long enough to watch."""
    d = tmp_path_factory.mktemp("big")
    return write_safetensors(d / "flux_big.safetensors", flux_tensors(1024, 3))


def leftovers(models: Path):
    """Files a conversion may leave in the output dirs other than published outputs and the
    cache's state (temporaries are `.NAME.PID.tmp`)."""
    found = []
    for root, _dirs, files in os.walk(models):
        for f in files:
            if f.endswith(".tmp"):
                found.append(os.path.join(root, f))
    return found


def outputs(models: Path):
    """Published outputs (files directly in the output dirs, not hidden)."""
    found = []
    for sub in ("diffusion_models/converted", "diffusion_models/gguf"):
        d = models / sub
        if d.is_dir():
            found += sorted(str(p) for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
    return found
