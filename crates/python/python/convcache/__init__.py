"""convcache: convert diffusion-model checkpoints between precisions and quantization formats, once.

``smart_convert(source, target)`` answers with a file in the target precision: the source
itself when it already is the target, a validated earlier conversion from the cache, or a new
conversion (verified, then published atomically). The work is done in-process by convcache's
Rust crates (the same code as the ``convcache`` command line); the GIL is released while a
conversion runs, and Ctrl-C cancels it cleanly.

Paths may be ``str`` or any ``os.PathLike``. The models dir (where conversions are cached, in
``<models>/diffusion_models/converted`` and ``<models>/diffusion_models/gguf``) defaults as in
the command line: ``$CONVCACHE_MODELS_DIR``, else, inside ComfyUI, ComfyUI's own models dir
(``folder_paths.models_dir``), else the ``models/`` of a ComfyUI install above the current
directory, else ``./models``. Inside ComfyUI a source may also be given as a model name from
ComfyUI's ``diffusion_models`` or ``checkpoints`` lists (any folder of them, including those of
``extra_model_paths.yaml``).

Errors: :class:`ConvcacheError` and its subclasses :class:`SourceError` (bad input),
:class:`ConversionError` (the conversion failed) and :class:`Cancelled`; an unknown target or
``conversion_type`` is a :class:`ValueError`.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, Optional, Tuple, Union

from . import _native
from ._native import Cancelled, ConversionError, ConvcacheError, SourceError

__all__ = [
    "ConvcacheError",
    "SourceError",
    "ConversionError",
    "Cancelled",
    "smart_convert",
    "batch_check_conversions",
    "check_conversions",
    "list_converted_models",
    "get_conversion_stats",
    "cleanup_old_conversions",
    "detect_model_precision",
    "should_skip_conversion",
    "get_converted_model_path",
    "detect",
    "models_dir",
    "resolve_source",
    "supported_targets",
    "conversion_type_of",
]

PathLike = Union[str, "os.PathLike[str]"]
Progress = Callable[[int, int, str], Optional[bool]]

#: ComfyUI's folder lists a source name is looked up in, in this order.
COMFYUI_SOURCE_FOLDERS = ("diffusion_models", "checkpoints")


def _comfyui_folder_paths():
    """ComfyUI's ``folder_paths`` module when running inside ComfyUI, else None.

    Only a module ComfyUI already imported counts: importing one here could pick up an
    unrelated ``folder_paths`` from ``sys.path``.
    """
    module = sys.modules.get("folder_paths")
    if module is None or not hasattr(module, "get_full_path"):
        return None
    return module


def models_dir(models_dir: Optional[PathLike] = None) -> str:
    """The models dir a call with this ``models_dir`` argument uses (see the module docs)."""
    return _native.resolve_models_dir(_models_dir_arg(models_dir))


def _models_dir_arg(models_dir: Optional[PathLike]) -> Optional[str]:
    if models_dir is not None:
        return os.fspath(models_dir)
    if os.environ.get(_native.MODELS_DIR_ENV):
        return None  # the native side reads it, as the CLI does
    fp = _comfyui_folder_paths()
    comfy_models = getattr(fp, "models_dir", None) if fp is not None else None
    return os.fspath(comfy_models) if comfy_models else None


def resolve_source(source_path: PathLike) -> str:
    """The file a source argument names: the path itself when it exists; inside ComfyUI, else,
    the model of that name in ComfyUI's ``diffusion_models`` or ``checkpoints`` folders
    (``extra_model_paths.yaml`` included). A name found nowhere is returned as given, so the
    error names it."""
    path = os.fspath(source_path)
    if os.path.exists(path):
        return path
    fp = _comfyui_folder_paths()
    if fp is not None:
        for folder in COMFYUI_SOURCE_FOLDERS:
            try:
                full = fp.get_full_path(folder, path)
            except Exception:  # an unknown folder name in an older ComfyUI
                full = None
            if full:
                return full
    return path


def smart_convert(
    source_path: PathLike,
    target_precision: str,
    *,
    models_dir: Optional[PathLike] = None,
    strict: bool = False,
    progress: Optional[Progress] = None,
    keep_partial: bool = False,
) -> Tuple[str, bool]:
    """Convert ``source_path`` to ``target_precision``, or answer from the source or the cache.

    Returns ``(path, was_newly_converted)``. ``target_precision`` is any name the command line's
    ``--to`` accepts (``fp16``, ``bf16``, ``fp8``, ``fp8_scaled``, ``nf4``, ``Q4_K_M``,
    ``gguf_f16``...). With ``strict``, a file at the cache path without convcache's provenance
    is not used.

    ``progress(bytes_done, bytes_total, stage)`` is called as the conversion goes (stage one of
    ``planning``, ``hashing``, ``converting``, ``verifying``, ``publishing``; at most about ten
    calls a second within a stage, its first and last always), from the converting thread with
    the GIL held. Returning ``False`` cancels: :class:`Cancelled` is raised, nothing is
    published and the temporary is removed. An exception raised by ``progress`` cancels the
    same way and is re-raised.

    The GIL is released while converting. ``KeyboardInterrupt`` (Ctrl-C) cancels the
    conversion, waits for it to stop (nothing published, temporary removed) and propagates.
    With ``keep_partial``, a cancelled conversion instead keeps its temporary and resume journal
    (once it made a checkpoint, about every second), and the next call for the same pair
    continues from there, as the command line does after Ctrl-C. A conversion killed outright
    is always resumed by the next call.
    """
    return _native.smart_convert(
        resolve_source(source_path),
        target_precision,
        models_dir=_models_dir_arg(models_dir),
        strict=strict,
        progress=progress,
        keep_partial=keep_partial,
    )


def batch_check_conversions(
    source_path: PathLike,
    precisions: List[str],
    *,
    models_dir: Optional[PathLike] = None,
) -> Dict[str, Tuple[bool, str]]:
    """``{precision: (exists, path)}`` for each of ``precisions`` (keys as given), converting
    nothing. ``exists`` is whether a valid conversion is there (or the source already is the
    target), as ``convcache check`` decides it; ``path`` is the file that would answer, or where
    a conversion would be published."""
    return _native.batch_check_conversions(
        resolve_source(source_path), list(precisions), models_dir=_models_dir_arg(models_dir)
    )


def check_conversions(
    source_path: PathLike,
    targets: List[str],
    *,
    models_dir: Optional[PathLike] = None,
) -> List[dict]:
    """``convcache check --json``'s rows: per target a dict with ``source``, ``target``,
    ``status`` (``source_is_target``, ``hit``, ``unverified``, ``missing``, ``stale``,
    ``broken``, ``foreign``), ``valid``, ``exists``, ``path`` and ``reason``."""
    source = resolve_source(source_path)
    return _native.check_conversions(
        source, list(targets), models_dir=_models_dir_arg(models_dir)
    )


def list_converted_models(
    conversion_type: str = "all",
    *,
    models_dir: Optional[PathLike] = None,
) -> List[Tuple[str, str, str]]:
    """``[(basename, precision, path)]`` of the cached outputs, as ``convcache list`` lists
    them (sorted by path). ``conversion_type``: ``'precision'`` (safetensors casts and ComfyUI's
    fp8_scaled/nvfp4/mxfp8), ``'bitsandbytes'`` (nf4, fp4, int8), ``'gguf'`` or ``'all'``."""
    return _native.list_converted_models(
        conversion_type, models_dir=_models_dir_arg(models_dir)
    )


def get_conversion_stats(
    conversion_type: str = "all",
    *,
    models_dir: Optional[PathLike] = None,
) -> dict:
    """Totals of the outputs of ``conversion_type``: ``convcache stats --json``'s fields
    (``count``, ``total_bytes``, ``by_precision`` ``{precision: {count, bytes}}``,
    ``unusable`` ``{count, bytes}``: files with an output's name that cannot serve), plus
    ``total_size_gb`` (GiB) and ``models_by_precision`` ``{precision: count}``."""
    return _native.get_conversion_stats(
        conversion_type, models_dir=_models_dir_arg(models_dir)
    )


def cleanup_old_conversions(
    source_path: PathLike,
    conversion_type: str = "all",
    keep_count: int = 3,
    *,
    dry_run: bool = False,
    models_dir: Optional[PathLike] = None,
) -> List[str]:
    """Keep the ``keep_count`` most recently used conversions of ``source_path`` (among those of
    ``conversion_type``) and delete the others, as ``convcache cleanup SRC --keep N``. Returns
    the deleted paths (with ``dry_run``, those that would be deleted, deleting nothing). Files
    convcache did not make are never deleted."""
    return _native.cleanup_old_conversions(
        resolve_source(source_path),
        conversion_type,
        keep_count,
        dry_run=dry_run,
        models_dir=_models_dir_arg(models_dir),
    )


def detect_model_precision(path: PathLike) -> Optional[str]:
    """The file's precision from its header (``fp16``, ``bf16``, ``fp8_e4m3fn``, ``nf4``,
    ``fp8_scaled``, ``Q4_K_M``...), or ``None`` when it cannot be determined. A file that cannot
    be read as a model raises :class:`SourceError`."""
    return _native.detect_model_precision(resolve_source(path))


def should_skip_conversion(source_path: PathLike, target: str) -> Tuple[bool, str]:
    """``(True, reason)`` when the source already is ``target`` (``smart_convert`` answers with
    the source itself), else ``(False, reason)``."""
    return _native.should_skip_conversion(resolve_source(source_path), target)


def get_converted_model_path(
    source_path: PathLike,
    target: str,
    *,
    models_dir: Optional[PathLike] = None,
) -> str:
    """The file ``smart_convert(source_path, target)`` would answer with, or where its
    conversion would be published, converting nothing (``convcache check``'s ``path``)."""
    return _native.get_converted_model_path(
        resolve_source(source_path), target, models_dir=_models_dir_arg(models_dir)
    )


def detect(path: PathLike) -> dict:
    """Everything ``convcache detect --json`` says about one file: ``path``, ``format``,
    ``precision``, ``evidence``, ``histogram``, ``architecture``, ``file_size``,
    ``tensor_count``, ``fp8_scaling``, ``bitsandbytes``, ``notes``, ... (see docs/cli.md)."""
    return _native.detect(resolve_source(path))


def supported_targets() -> List[str]:
    """Every target name ``smart_convert`` accepts, in its canonical spelling."""
    return _native.supported_targets()


def conversion_type_of(target: str) -> str:
    """The ``conversion_type`` the outputs of ``target`` belong to: ``'precision'``,
    ``'bitsandbytes'`` or ``'gguf'`` (an unknown target is a :class:`ValueError`)."""
    return _native.conversion_type_of(target)
