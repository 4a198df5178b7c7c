"""convcache's ComfyUI nodes: convert a model once and load the cached conversion.

ComfyUI's modules (``folder_paths``, ``comfy.sd``, ``comfy.utils``, ``comfy.model_management``,
``nodes``) are imported when a node runs, not when this file is imported, so the pack loads
(and its tests run) against whatever ComfyUI provides.
"""

from __future__ import annotations

import importlib
import os

import convcache

CATEGORY = "loaders/convcache"

#: ComfyUI folder lists the model inputs offer, as "<folder>/<name>".
SOURCE_FOLDERS = ("diffusion_models", "checkpoints")

#: Where bitsandbytes outputs load (ComfyUI's own loaders cannot).
BNB_LOADER_HINT = (
    "bitsandbytes targets (nf4, fp4, int8) are not loaded by ComfyUI's own loaders: they need a "
    "bitsandbytes loader node, such as 'CheckpointLoaderNF4' of comfyanonymous/"
    "ComfyUI_bitsandbytes_NF4 (full checkpoints), or Forge. Use 'Convert Model (convcache)' to "
    "make the file and pass its path to such a loader, or pick a target ComfyUI loads itself "
    "(fp16, bf16, fp8, fp8_scaled, nvfp4, mxfp8, or a GGUF type such as Q4_K_M with ComfyUI-GGUF)."
)

GGUF_MISSING = (
    "{path}: GGUF outputs load with ComfyUI-GGUF's 'Unet Loader (GGUF)', and ComfyUI-GGUF is not "
    "installed: clone https://github.com/city96/ComfyUI-GGUF into custom_nodes (and "
    "`pip install gguf`), restart ComfyUI, or pick a safetensors target (fp16, bf16, fp8, "
    "fp8_scaled...)."
)


def _comfy(name):
    return importlib.import_module(name)


def model_choices():
    """Every model of ComfyUI's diffusion_models and checkpoints lists, as "<folder>/<name>"."""
    folder_paths = _comfy("folder_paths")
    choices = []
    for folder in SOURCE_FOLDERS:
        try:
            names = folder_paths.get_filename_list(folder)
        except Exception:  # a folder this ComfyUI does not know
            continue
        choices += [f"{folder}/{name}" for name in names]
    return choices


def resolve_choice(choice: str) -> str:
    """The file a "<folder>/<name>" choice names (any folder of that list, including those of
    extra_model_paths.yaml)."""
    folder_paths = _comfy("folder_paths")
    folder, _, name = choice.partition("/")
    full = folder_paths.get_full_path(folder, name) if folder in SOURCE_FOLDERS and name else None
    if not full:
        raise convcache.SourceError(f"{choice}: not found in ComfyUI's {folder or 'model'} folders")
    return full


def _progress_callback():
    """A smart_convert progress callback driving a ComfyUI progress bar, that cancels the
    conversion when the user interrupts the queue."""
    utils = _comfy("comfy.utils")
    mm = _comfy("comfy.model_management")
    steps = 1000
    bar = utils.ProgressBar(steps)

    def progress(done, total, stage):
        if mm.processing_interrupted():
            return False
        if stage in ("hashing", "converting") and total:
            bar.update_absolute(min(steps, done * steps // total), steps)
        elif stage in ("verifying", "publishing"):
            bar.update_absolute(steps, steps)
        return None

    return progress


def convert(model: str, target: str):
    """Converts (or finds the cached conversion of) a "<folder>/<name>" model; returns
    (path, newly_converted). A UI interrupt raises ComfyUI's interrupt exception."""
    source = resolve_choice(model)
    try:
        return convcache.smart_convert(source, target, progress=_progress_callback())
    except convcache.Cancelled:
        # The conversion stopped because of the interrupt: let ComfyUI handle it as one.
        _comfy("comfy.model_management").throw_exception_if_processing_interrupted()
        raise


class ConvertModel:
    """Convert Model (convcache): a model of ComfyUI's lists in the target precision, converted
    once and cached; outputs the file's path and whether it was converted now."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (model_choices(), {"tooltip": "A diffusion model or checkpoint."}),
                "target": (convcache.supported_targets(), {"default": "fp16"}),
            }
        }

    RETURN_TYPES = ("STRING", "BOOLEAN")
    RETURN_NAMES = ("path", "newly_converted")
    FUNCTION = "convert"
    CATEGORY = CATEGORY
    DESCRIPTION = __doc__

    def convert(self, model, target):
        path, new = convert(model, target)
        return (path, new)


class LoadDiffusionModel:
    """Load Diffusion Model (convcache): converts the model to the target (or finds the cached
    conversion) and loads it: safetensors with ComfyUI's diffusion-model loader, GGUF with
    ComfyUI-GGUF's loader."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (model_choices(), {"tooltip": "A diffusion model or checkpoint."}),
                "target": (convcache.supported_targets(), {"default": "fp8_scaled"}),
            }
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = __doc__

    def load(self, model, target):
        kind = convcache.conversion_type_of(target)
        if kind == "bitsandbytes":
            raise ValueError(f"{target}: {BNB_LOADER_HINT}")
        if kind == "gguf":
            # Fail before converting: the output could not be loaded.
            gguf_loader = _gguf_loader()
            if gguf_loader is None:
                raise RuntimeError(GGUF_MISSING.format(path=model))
        path, _new = convert(model, target)
        if path.endswith(".gguf"):
            gguf_loader = _gguf_loader()
            if gguf_loader is None:
                raise RuntimeError(GGUF_MISSING.format(path=path))
            return gguf_loader().load_unet(_unet_name(path))
        sd = _comfy("comfy.sd")
        return (sd.load_diffusion_model(path, model_options={}),)


def _gguf_loader():
    """ComfyUI-GGUF's UnetLoaderGGUF node class, when that pack is loaded."""
    try:
        nodes = _comfy("nodes")
    except ImportError:
        return None
    return getattr(nodes, "NODE_CLASS_MAPPINGS", {}).get("UnetLoaderGGUF")


def _unet_name(path: str) -> str:
    """The name ComfyUI-GGUF's loader takes for a file (relative to a diffusion_models folder)."""
    folder_paths = _comfy("folder_paths")
    real = os.path.realpath(path)
    for base in folder_paths.get_folder_paths("diffusion_models"):
        base = os.path.realpath(base)
        if os.path.commonpath([real, base]) == base:
            return os.path.relpath(real, base)
    raise RuntimeError(
        f"{path}: not inside ComfyUI's diffusion_models folders, so ComfyUI-GGUF cannot load it; "
        "leave CONVCACHE_MODELS_DIR unset inside ComfyUI (conversions then go to ComfyUI's models dir)"
    )


class ConversionCacheInfo:
    """Conversion Cache Info: the cached conversions and their totals, as text."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conversion_type": (["all", "precision", "bitsandbytes", "gguf"],)}}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("info",)
    FUNCTION = "info"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = __doc__

    def info(self, conversion_type):
        text = cache_info_text(conversion_type)
        return {"ui": {"text": [text]}, "result": (text,)}


def cache_info_text(conversion_type: str = "all") -> str:
    stats = convcache.get_conversion_stats(conversion_type)
    lines = [
        f"{convcache.models_dir()}: {stats['count']} conversion(s), {stats['total_size_gb']:.2f} GiB"
    ]
    for precision, totals in stats["by_precision"].items():
        lines.append(f"  {precision:<12} {totals['count']:>4}  {totals['bytes'] / 2**30:8.2f} GiB")
    if stats["unusable"]["count"]:
        lines.append(f"  {stats['unusable']['count']} file(s) with an output's name that cannot serve")
    for basename, precision, path in convcache.list_converted_models(conversion_type):
        lines.append(f"{precision:<12} {basename:<32} {path}")
    return "\n".join(lines)


NODE_CLASS_MAPPINGS = {
    "ConvcacheConvertModel": ConvertModel,
    "ConvcacheLoadDiffusionModel": LoadDiffusionModel,
    "ConvcacheCacheInfo": ConversionCacheInfo,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ConvcacheConvertModel": "Convert Model (convcache)",
    "ConvcacheLoadDiffusionModel": "Load Diffusion Model (convcache)",
    "ConvcacheCacheInfo": "Conversion Cache Info",
}
