"""Every API function against the CLI's answers on the same models dir."""

from __future__ import annotations

import os
import pathlib

import pytest

import convcache
from conftest import cli, flux_tensors, outputs, write_safetensors


def test_smart_convert_converts_then_answers_from_the_cache(models, small_model):
    path, new = convcache.smart_convert(small_model, "fp16", models_dir=models)
    assert new is True
    assert path == str(models / "diffusion_models" / "converted" / "flux_small_fp16.safetensors")
    assert os.path.isfile(path)
    # The CLI sees the same output as a valid hit...
    _, rows, _ = cli("convert", str(small_model), "--to", "fp16", models_dir=models)
    assert rows[0]["status"] == "cached" and rows[0]["path"] == path
    # ...and so does the package, the second time.
    again = convcache.smart_convert(str(small_model), "fp16", models_dir=str(models))
    assert again == (path, False)


def test_smart_convert_source_is_target(models, small_model):
    path, new = convcache.smart_convert(small_model, "fp32", models_dir=models)
    assert (path, new) == (str(small_model), False)
    assert outputs(models) == []


def test_smart_convert_answers_a_conversion_the_cli_made(models, small_model):
    _, rows, _ = cli("convert", str(small_model), "--to", "Q8_0,nf4", models_dir=models)
    for row in rows:
        assert row["status"] == "converted"
        got = convcache.smart_convert(small_model, row["target"], models_dir=models)
        assert got == (row["path"], False)


def test_paths_may_be_pathlike(models, small_model):
    class Custom(os.PathLike):
        def __init__(self, p):
            self.p = p

        def __fspath__(self):
            return str(self.p)

    path, _ = convcache.smart_convert(Custom(small_model), "bf16", models_dir=Custom(models))
    assert pathlib.Path(path).parent == models / "diffusion_models" / "converted"
    assert convcache.detect_model_precision(pathlib.Path(path)) == "bf16"


def test_batch_check_conversions_matches_check(models, small_model):
    convcache.smart_convert(small_model, "bf16", models_dir=models)
    asked = ["fp32", "bf16", "fp8", "Q4_K_M", "nf4"]
    got = convcache.batch_check_conversions(small_model, asked, models_dir=models)
    _, rows, _ = cli("check", str(small_model), "--to", ",".join(asked), models_dir=models)
    assert list(got) == asked
    for name, row in zip(asked, rows):
        assert got[name] == (row["valid"], row["path"]), name
    assert got["bf16"][0] is True and got["fp32"] == (True, str(small_model))
    assert got["Q4_K_M"][0] is False
    # The full rows are the CLI's.
    assert convcache.check_conversions(small_model, asked, models_dir=models) == rows


def test_get_converted_model_path_matches_check(models, small_model):
    for target in ["fp16", "fp8", "Q5_K_S", "fp32"]:
        _, rows, _ = cli("check", str(small_model), "--to", target, models_dir=models)
        assert convcache.get_converted_model_path(small_model, target, models_dir=models) == rows[0]["path"]


def _fill_cache(models, small_model):
    cli("convert", str(small_model), "--to", "fp16,fp8,nf4,Q8_0,Q4_K_M", models_dir=models)
    # A file with an output's name that is not a model: listed with a problem, as the CLI does.
    (models / "diffusion_models" / "converted" / "junk_bf16.safetensors").write_bytes(b"not a model")


def test_list_converted_models_matches_list(models, small_model):
    _fill_cache(models, small_model)
    _, rows, _ = cli("list", models_dir=models)
    expect = [(r["basename"], r["precision"], r["path"]) for r in rows]
    assert convcache.list_converted_models(models_dir=models) == expect
    assert convcache.list_converted_models("all", models_dir=models) == expect
    _, gguf_rows, _ = cli("list", "--kind", "gguf", models_dir=models)
    gguf = convcache.list_converted_models("gguf", models_dir=models)
    assert gguf == [(r["basename"], r["precision"], r["path"]) for r in gguf_rows]
    assert {p for _, p, _ in gguf} == {"Q8_0", "Q4_K_M"}
    _, st_rows, _ = cli("list", "--kind", "precision", models_dir=models)
    precision = convcache.list_converted_models("precision", models_dir=models)
    bnb = convcache.list_converted_models("bitsandbytes", models_dir=models)
    assert {p for _, p, _ in bnb} == {"nf4"}
    assert {p for _, p, _ in precision} == {"fp16", "fp8_e4m3fn", "bf16"}
    assert sorted(precision + bnb, key=lambda e: e[2]) == [
        (r["basename"], r["precision"], r["path"]) for r in st_rows
    ]


def test_get_conversion_stats_matches_stats(models, small_model):
    _fill_cache(models, small_model)
    _, expect, _ = cli("stats", models_dir=models)
    got = convcache.get_conversion_stats(models_dir=models)
    for key in ("count", "total_bytes", "by_precision", "unusable"):
        assert got[key] == expect[key], key
    assert got["count"] == 5 and got["unusable"]["count"] == 1
    assert got["total_size_gb"] == pytest.approx(expect["total_bytes"] / 2**30)
    assert got["models_by_precision"] == {k: v["count"] for k, v in expect["by_precision"].items()}
    _, gguf, _ = cli("stats", "--kind", "gguf", models_dir=models)
    got = convcache.get_conversion_stats("gguf", models_dir=models)
    assert {k: got[k] for k in gguf} == gguf
    bnb = convcache.get_conversion_stats("bitsandbytes", models_dir=models)
    assert bnb["models_by_precision"] == {"nf4": 1} and bnb["unusable"]["count"] == 0


def test_cleanup_old_conversions_matches_cleanup(models, small_model, tmp_path):
    _fill_cache(models, small_model)
    # The same cache twice: one cleaned by the CLI, one by the package.
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(models, twin / "models", symlinks=True)
    twin_models = twin / "models"
    _, cli_dry, _ = cli("cleanup", str(small_model), "--keep", "2", "--dry-run", models_dir=twin_models)
    dry = convcache.cleanup_old_conversions(small_model, keep_count=2, dry_run=True, models_dir=models)
    assert sorted(dry) == sorted(r["path"].replace(str(twin_models), str(models)) for r in cli_dry["removed"])
    assert len(dry) == 3 and all(os.path.exists(p) for p in dry)

    gguf_removed = convcache.cleanup_old_conversions(small_model, "gguf", 1, models_dir=models)
    assert len(gguf_removed) == 1 and gguf_removed[0].endswith(".gguf")
    assert not os.path.exists(gguf_removed[0])
    assert len(convcache.list_converted_models("gguf", models_dir=models)) == 1

    removed = convcache.cleanup_old_conversions(small_model, keep_count=0, models_dir=models)
    _, cli_rm, _ = cli("cleanup", str(small_model), "--keep", "0", models_dir=twin_models)
    assert len(removed) == 4 and len(cli_rm["removed"]) == 5
    # The file convcache did not make stays.
    assert [p for _, _, p in convcache.list_converted_models(models_dir=models)] == [
        str(models / "diffusion_models" / "converted" / "junk_bf16.safetensors")
    ]


def test_detect_matches_detect(models, small_model):
    _, rows, _ = cli("detect", str(small_model))
    assert convcache.detect(small_model) == rows[0]
    assert rows[0]["architecture"] == "flux"
    q, _ = convcache.smart_convert(small_model, "Q4_K_M", models_dir=models)
    _, rows, _ = cli("detect", q)
    assert convcache.detect(q) == rows[0]


def test_detect_model_precision(models, small_model):
    assert convcache.detect_model_precision(small_model) == "fp32"
    for target, name in [("fp8", "fp8_e4m3fn"), ("nf4", "nf4"), ("q8_0", "Q8_0")]:
        path, _ = convcache.smart_convert(small_model, target, models_dir=models)
        assert convcache.detect_model_precision(path) == name
        assert cli("detect", path)[1][0]["precision"] == name


def test_should_skip_conversion(small_model):
    skip, why = convcache.should_skip_conversion(small_model, "fp32")
    assert skip is True and "already" in why
    skip, why = convcache.should_skip_conversion(small_model, "float32")
    assert skip is True
    skip, why = convcache.should_skip_conversion(small_model, "fp16")
    assert skip is False and "fp32" in why and "fp16" in why


def test_models_dir_defaults_as_the_cli(tmp_path, monkeypatch, small_model):
    monkeypatch.setenv("CONVCACHE_MODELS_DIR", str(tmp_path / "env_models"))
    assert convcache.models_dir() == str(tmp_path / "env_models")
    path, _ = convcache.smart_convert(small_model, "fp16")
    assert path.startswith(str(tmp_path / "env_models" / "diffusion_models" / "converted"))
    monkeypatch.delenv("CONVCACHE_MODELS_DIR")
    # A ComfyUI install above the current directory.
    install = tmp_path / "ComfyUI"
    (install / "models" / "checkpoints").mkdir(parents=True)
    (install / "main.py").write_text("")
    (install / "folder_paths.py").write_text("")
    monkeypatch.chdir(install / "models" / "checkpoints")
    assert convcache.models_dir() == str(install / "models")
    monkeypatch.chdir(tmp_path)
    assert convcache.models_dir() == str(tmp_path / "models")


def test_supported_targets_all_convert_names(small_model):
    targets = convcache.supported_targets()
    for t in ["fp16", "bf16", "fp8_e4m3fn", "nf4", "int8", "fp8_scaled", "nvfp4", "Q4_K_M", "gguf_f16"]:
        assert t in targets
    # Every name is one the CLI accepts.
    _, rows, _ = cli("check", str(small_model), "--to", ",".join(targets), check=False)
    assert rows is not None and [r["target"] for r in rows] != []


def test_a_big_gguf_target_roundtrip(models):
    src = write_safetensors(models / "diffusion_models" / "flux_b.safetensors", flux_tensors(256, 1), "BF16")
    path, new = convcache.smart_convert(src, "Q8_0", models_dir=models)
    assert new and path.endswith("flux_b_Q8_0.gguf")
    assert convcache.smart_convert(src, "bf16", models_dir=models) == (str(src), False)


def test_strict_skips_a_file_convcache_did_not_make(models, small_model):
    # A bf16 file at the cache path without provenance (another tool made it).
    converted = models / "diffusion_models" / "converted"
    converted.mkdir(parents=True)
    foreign = write_safetensors(converted / "flux_small_bf16.safetensors", flux_tensors(96, 2), "BF16")
    assert convcache.smart_convert(small_model, "bf16", models_dir=models) == (str(foreign), False)
    _, rows, _ = cli("check", str(small_model), "--to", "bf16", "--strict", models_dir=models)
    path, new = convcache.smart_convert(small_model, "bf16", models_dir=models, strict=True)
    assert new is True and path != str(foreign) and path == rows[0]["path"]
    assert foreign.is_file()  # never replaced
