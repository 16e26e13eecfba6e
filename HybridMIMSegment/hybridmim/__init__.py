"""HybridMIMSegment engine: pure Python (torch, MONAI, SimpleITK); shared by the Slicer module, the CLI and the
training package. Never imports slicer, qt or vtk.

Importing the package is light (no torch): Slicer lists model cards before its Python packages are installed.
``Segmenter``, ``segment_file`` and ``load_model`` are imported on first use.
"""

from importlib import import_module

from .errors import Cancelled, ChecksumError, HybridMIMError, InputImageError, ModelNotFoundError

__version__ = "0.1.0"

_LAZY = {"Segmenter": "inference", "segment_file": "inference", "load_model": "model_store",
         "list_models": "model_store"}

__all__ = ["Cancelled", "ChecksumError", "HybridMIMError", "InputImageError", "ModelNotFoundError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
