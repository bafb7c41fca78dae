"""Loads hecate._C, which registers the torch.ops.hecate operators.

Import never requires CUDA: a CPU-only build registers CPU kernels only.
"""
import importlib

_loaded = None
_error = None


def load() -> bool:
    """Import the compiled extension once; return whether it is available."""
    global _loaded, _error
    if _loaded is None:
        try:
            importlib.import_module("hecate._C")
            _loaded = True
        except ImportError as exc:  # not built yet: callers fall back or raise
            _loaded, _error = False, exc
    return _loaded


def require() -> None:
    if not load():
        raise RuntimeError(
            f"hecate._C is not built ({_error}). Run `make build` "
            "(or `pip install --no-build-isolation -e .`) in the repository root."
        )
