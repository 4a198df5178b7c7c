"""The node pack (comfyui/) against stand-ins for ComfyUI's folder_paths, comfy.sd, comfy.utils,
comfy.model_management and nodes modules (ComfyUI itself is not on PyPI)."""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import pytest

import convcache
from conftest import REPO, cli, flux_tensors, outputs, leftovers, write_safetensors


class Interrupted(Exception):
    """The stand-in for comfy.model_management.InterruptProcessingException."""


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    """A ComfyUI layout (models/diffusion_models, models/checkpoints, and an extra checkpoints
    folder as extra_model_paths.yaml adds one) and stand-in modules; yields a namespace."""
    models = tmp_path / "ComfyUI" / "models"
    dm = models / "diffusion_models"
    ck = models / "checkpoints"
    extra = tmp_path / "elsewhere" / "checkpoints"
    for d in (dm, ck, extra):
        d.mkdir(parents=True)
    folders = {"diffusion_models": [str(dm), str(models / "unet")], "checkpoints": [str(ck), str(extra)]}
    folders["unet"] = folders["diffusion_models"]

    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(models)

    def get_folder_paths(name):
        return list(folders[name])

    def get_filename_list(name):
        out = []
        for base in folders[name]:
            for root, _d, files in os.walk(base):
                for f in files:
                    if f.endswith((".safetensors", ".gguf")) and not f.startswith("."):
                        out.append(os.path.relpath(os.path.join(root, f), base))
        return sorted(out)

    def get_full_path(name, filename):
        for base in folders.get(name, []):
            p = os.path.join(base, filename)
            if os.path.isfile(p):
                return p
        return None

    fp.get_folder_paths, fp.get_filename_list, fp.get_full_path = get_folder_paths, get_filename_list, get_full_path

    ns = types.SimpleNamespace(models=models, dm=dm, ck=ck, extra=extra, bars=[], loaded=[], interrupt=False)

    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total):
            self.total, self.values = total, []
            ns.bars.append(self)

        def update_absolute(self, value, total=None, preview=None):
            self.values.append(value)

    utils.ProgressBar = ProgressBar

    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = Interrupted
    mm.processing_interrupted = lambda: ns.interrupt

    def throw():
        if ns.interrupt:
            ns.interrupt = False
            raise Interrupted()

    mm.throw_exception_if_processing_interrupted = throw

    sd = types.ModuleType("comfy.sd")

    def load_diffusion_model(path, model_options=None):
        ns.loaded.append(("comfy.sd", path, model_options))
        return f"MODEL({os.path.basename(path)})"

    sd.load_diffusion_model = load_diffusion_model
    comfy_pkg = types.ModuleType("comfy")
    comfy_pkg.sd, comfy_pkg.utils, comfy_pkg.model_management = sd, utils, mm
    nodes_mod = types.ModuleType("nodes")
    nodes_mod.NODE_CLASS_MAPPINGS = {}
    ns.nodes = nodes_mod
    for name, mod in {
        "folder_paths": fp,
        "comfy": comfy_pkg,
        "comfy.sd": sd,
        "comfy.utils": utils,
        "comfy.model_management": mm,
        "nodes": nodes_mod,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delenv("CONVCACHE_MODELS_DIR", raising=False)

    # Load the pack as ComfyUI loads a custom_nodes folder: by path, under the folder's name.
    spec = importlib.util.spec_from_file_location(
        "convcache_nodes", REPO / "comfyui" / "__init__.py", submodule_search_locations=[str(REPO / "comfyui")]
    )
    pack = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "convcache_nodes", pack)
    spec.loader.exec_module(pack)
    ns.pack = pack
    ns.src = write_safetensors(dm / "flux_dev.safetensors", flux_tensors(96, 2))
    ns.ckpt = write_safetensors(extra / "flux_extra.safetensors", flux_tensors(64, 1))
    yield ns


def node(ns, display):
    for key, name in ns.pack.NODE_DISPLAY_NAME_MAPPINGS.items():
        if name == display:
            return ns.pack.NODE_CLASS_MAPPINGS[key]
    raise KeyError(display)


def test_the_pack_registers_three_nodes(comfy):
    assert set(comfy.pack.NODE_DISPLAY_NAME_MAPPINGS.values()) == {
        "Convert Model (convcache)",
        "Load Diffusion Model (convcache)",
        "Conversion Cache Info",
    }
    for cls in comfy.pack.NODE_CLASS_MAPPINGS.values():
        assert callable(getattr(cls(), cls.FUNCTION))
        assert len(cls.RETURN_TYPES) >= 1


def test_convert_inputs_list_both_folders_and_the_targets(comfy):
    inputs = node(comfy, "Convert Model (convcache)").INPUT_TYPES()["required"]
    models = inputs["model"][0]
    assert "diffusion_models/flux_dev.safetensors" in models
    assert "checkpoints/flux_extra.safetensors" in models  # an extra_model_paths folder
    targets = inputs["target"][0]
    assert targets == convcache.supported_targets() and "Q4_K_M" in targets and "fp8_scaled" in targets
    assert node(comfy, "Convert Model (convcache)").RETURN_TYPES == ("STRING", "BOOLEAN")


def test_convert_node_converts_into_comfyuis_models_dir_with_progress(comfy):
    cls = node(comfy, "Convert Model (convcache)")
    path, new = cls().convert("checkpoints/flux_extra.safetensors", "fp16")
    assert new is True
    assert path == str(comfy.models / "diffusion_models" / "converted" / "flux_extra_fp16.safetensors")
    bar = comfy.bars[-1]
    assert bar.values and bar.values[-1] == bar.total
    assert all(a <= b for a, b in zip(bar.values, bar.values[1:]))
    # The CLI, pointed at the same models dir, answers from the same cache.
    _, rows, _ = cli("check", str(comfy.ckpt), "--to", "fp16", models_dir=comfy.models)
    assert rows[0]["status"] == "hit" and rows[0]["path"] == path
    assert cls().convert("checkpoints/flux_extra.safetensors", "fp16") == (path, False)
    # The package's own calls see ComfyUI's models dir and model names too.
    assert convcache.models_dir() == str(comfy.models)
    assert convcache.get_converted_model_path("flux_extra.safetensors", "fp16") == path


def test_convert_node_is_cancelled_by_the_ui_interrupt(comfy, big_model):
    os.symlink(big_model, comfy.dm / "flux_big.safetensors")

    class Bar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            if value > 0:
                comfy.interrupt = True  # the user presses Cancel mid-conversion

    sys.modules["comfy.utils"].ProgressBar = Bar
    with pytest.raises(Interrupted):
        node(comfy, "Convert Model (convcache)")().convert("diffusion_models/flux_big.safetensors", "fp16")
    assert outputs(comfy.models) == [] and leftovers(comfy.models) == []


def test_an_unknown_model_is_a_source_error(comfy):
    with pytest.raises(convcache.SourceError, match="nope.safetensors"):
        node(comfy, "Convert Model (convcache)")().convert("diffusion_models/nope.safetensors", "fp16")


def test_load_safetensors_with_comfys_loader(comfy):
    cls = node(comfy, "Load Diffusion Model (convcache)")
    inputs = cls.INPUT_TYPES()["required"]
    assert "diffusion_models/flux_dev.safetensors" in inputs["model"][0]
    assert cls.RETURN_TYPES == ("MODEL",)
    (model,) = cls().load("diffusion_models/flux_dev.safetensors", "fp8_scaled")
    assert model == "MODEL(flux_dev_fp8_scaled.safetensors)"
    assert comfy.loaded[-1][1] == str(comfy.dm / "converted" / "flux_dev_fp8_scaled.safetensors")
    # A target the source already is loads the source itself.
    (model,) = cls().load("diffusion_models/flux_dev.safetensors", "fp32")
    assert comfy.loaded[-1][1] == str(comfy.src)


def test_load_gguf_needs_comfyui_gguf(comfy):
    cls = node(comfy, "Load Diffusion Model (convcache)")
    with pytest.raises(RuntimeError, match="ComfyUI-GGUF"):
        cls().load("diffusion_models/flux_dev.safetensors", "Q8_0")
    assert outputs(comfy.models) == []  # refused before converting

    calls = []

    class UnetLoaderGGUF:
        def load_unet(self, unet_name, dequant_dtype=None, patch_dtype=None, patch_on_device=None):
            full = sys.modules["folder_paths"].get_full_path("unet", unet_name)
            calls.append((unet_name, full))
            return (f"GGUF({unet_name})",)

    comfy.nodes.NODE_CLASS_MAPPINGS["UnetLoaderGGUF"] = UnetLoaderGGUF
    (model,) = cls().load("diffusion_models/flux_dev.safetensors", "Q8_0")
    assert model == "GGUF(gguf/flux_dev_Q8_0.gguf)"
    assert calls == [("gguf/flux_dev_Q8_0.gguf", str(comfy.dm / "gguf" / "flux_dev_Q8_0.gguf"))]


def test_load_bitsandbytes_names_the_loader_it_needs(comfy):
    cls = node(comfy, "Load Diffusion Model (convcache)")
    for target in ("nf4", "int8"):
        with pytest.raises(ValueError, match="CheckpointLoaderNF4"):
            cls().load("diffusion_models/flux_dev.safetensors", target)
    assert outputs(comfy.models) == []


def test_cache_info_lists_and_totals(comfy):
    convcache.smart_convert(comfy.src, "bf16")
    convcache.smart_convert(comfy.src, "Q8_0")
    cls = node(comfy, "Conversion Cache Info")
    assert cls.INPUT_TYPES()["required"]["conversion_type"][0] == ["all", "precision", "bitsandbytes", "gguf"]
    out = cls().info("all")
    text = out["result"][0]
    assert out["ui"]["text"] == [text]
    assert "2 conversion(s)" in text and "flux_dev_bf16.safetensors" in text and "flux_dev_Q8_0.gguf" in text
    gguf_only = cls().info("gguf")["result"][0]
    assert "1 conversion(s)" in gguf_only and "bf16" not in gguf_only
