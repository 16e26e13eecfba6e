"""HybridMIMSegment engine: pure Python (torch, MONAI, SimpleITK); shared by the Slicer module, the CLI and the
training package. Never imports slicer, qt or vtk."""

from .errors import Cancelled, ChecksumError, HybridMIMError, InputImageError, ModelNotFoundError
from .inference import Segmenter, segment_file
from .model_store import list_models, load_model

__version__ = "0.1.0"

__all__ = ["Cancelled", "ChecksumError", "HybridMIMError", "InputImageError", "ModelNotFoundError", "Segmenter",
           "list_models", "load_model", "segment_file"]
