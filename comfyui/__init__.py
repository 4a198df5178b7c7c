"""convcache's ComfyUI node pack: "Convert Model (convcache)", "Load Diffusion Model
(convcache)" and "Conversion Cache Info".

Install: `pip install` the convcache package into ComfyUI's Python (see the repository's
README, "In ComfyUI"), then link or copy this folder into ComfyUI's `custom_nodes/` under a
name other than `convcache` (that name is the package's), e.g. `custom_nodes/convcache_nodes`.
"""

try:
    import convcache  # noqa: F401
except ImportError as e:  # pragma: no cover - shown in ComfyUI's log at start-up
    raise ImportError(
        "convcache node pack: the `convcache` Python package is not installed in ComfyUI's "
        "Python; run `pip install ./crates/python` from the convcache repository with that "
        "Python (see README.md, 'In ComfyUI')"
    ) from e
if not hasattr(convcache, "smart_convert"):
    raise ImportError(
        "convcache node pack: this folder must not be named `convcache` in custom_nodes (it "
        "would hide the convcache package); link it as e.g. custom_nodes/convcache_nodes"
    )

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
