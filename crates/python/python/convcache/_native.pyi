"""Type stubs of convcache's native module (see ``convcache`` for the documented API)."""

from os import PathLike
from typing import Callable, Dict, List, Optional, Tuple, Union

_Path = Union[str, PathLike[str]]

MODELS_DIR_ENV: str

class ConvcacheError(Exception):
    """Base class of convcache's errors; the message names the file concerned."""

class SourceError(ConvcacheError):
    """The input is at fault (the CLI's exit 2)."""

class ConversionError(ConvcacheError):
    """The conversion or a cache operation failed (the CLI's exit 1); nothing was published."""

class Cancelled(ConvcacheError):
    """The conversion was cancelled; nothing was published, the temporary was removed."""

def smart_convert(
    source_path: _Path,
    target_precision: str,
    *,
    models_dir: Optional[_Path] = None,
    strict: bool = False,
    progress: Optional[Callable[[int, int, str], Optional[bool]]] = None,
    keep_partial: bool = False,
) -> Tuple[str, bool]: ...
def batch_check_conversions(
    source_path: _Path, precisions: List[str], *, models_dir: Optional[_Path] = None
) -> Dict[str, Tuple[bool, str]]: ...
def check_conversions(
    source_path: _Path, targets: List[str], *, models_dir: Optional[_Path] = None
) -> List[dict]: ...
def list_converted_models(
    conversion_type: str = "all", *, models_dir: Optional[_Path] = None
) -> List[Tuple[str, str, str]]: ...
def get_conversion_stats(
    conversion_type: str = "all", *, models_dir: Optional[_Path] = None
) -> dict: ...
def cleanup_old_conversions(
    source_path: _Path,
    conversion_type: str = "all",
    keep_count: int = 3,
    *,
    dry_run: bool = False,
    models_dir: Optional[_Path] = None,
) -> List[str]: ...
def detect(path: _Path) -> dict: ...
def detect_model_precision(path: _Path) -> Optional[str]: ...
def should_skip_conversion(source_path: _Path, target: str) -> Tuple[bool, str]: ...
def get_converted_model_path(
    source_path: _Path, target: str, *, models_dir: Optional[_Path] = None
) -> str: ...
def resolve_models_dir(models_dir: Optional[_Path] = None) -> str: ...
def supported_targets() -> List[str]: ...
def conversion_type_of(target: str) -> str: ...
