"""Image/label pairs brought onto the model grid exactly as inference sees images (training, fine-tuning,
evaluation all use this, so what a model learns is what it is later shown)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .errors import InputImageError
from .geometry import ModelGrid, image_to_canonical, resize_labels
from .imageio import read_volume
from .model_card import ModelCard
from .partial import UNREVIEWED
from .preprocessing import checked_model_grid, model_input

ImageSource = sitk.Image | str | os.PathLike


@dataclass
class LabeledVolume:
    """A named image and its label map, if any (files or SimpleITK images), as given by a user, a datalist or a
    pre-training folder. ``modality`` ("CT" or "MRI"), where known, decides how pre-training normalises it."""

    name: str
    image: ImageSource
    label: ImageSource | None = None
    modality: str | None = None


def source_name(source: ImageSource, fallback: str) -> str:
    return fallback if isinstance(source, sitk.Image) else os.path.basename(str(source)).split(".")[0]


def as_image(source: ImageSource) -> sitk.Image:
    return source if isinstance(source, sitk.Image) else read_volume(source)


@dataclass
class Case:
    """``image``: (1, X, Y, Z) float32 normalised; ``label``: (X, Y, Z) uint8 or None, both on the model grid
    (``UNREVIEWED`` where a partly corrected volume was not reviewed)."""

    name: str
    image: np.ndarray
    label: np.ndarray | None
    grid: ModelGrid


def same_geometry(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=tolerance, atol=tolerance)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=tolerance, atol=tolerance * 10)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance))


def load_case(card: ModelCard, image_path: ImageSource, label_path: ImageSource | None = None,
              name: str | None = None, require_foreground: bool = False, partial: bool = False) -> Case:
    """Image (and label) on the card's model grid. Labels must match the image's geometry and use only the card's
    values (and, with ``partial``, ``UNREVIEWED``); with ``require_foreground`` a label without reviewed foreground
    is an error (nothing to learn from)."""
    name = name or source_name(image_path, "volume")
    image = as_image(image_path)
    grid = checked_model_grid(image, card)
    volume = model_input(image, grid, card.intensity)
    label = None
    if label_path is not None:
        label_image = as_image(label_path)
        if not same_geometry(image, label_image):
            raise InputImageError(f"The label map of '{name}' does not have the geometry of its image "
                                  f"(size/spacing/origin/direction differ)")
        values = image_to_canonical(label_image, grid)
        if not np.isfinite(values).all():
            raise InputImageError(f"The label map of '{name}' holds NaN or infinite values; label maps hold whole "
                                  "numbers")
        reviewed = values != UNREVIEWED if partial else np.ones(values.shape, bool)
        known = values[reviewed]
        if np.any(known != np.round(known)) or known.min(initial=0) < 0 or known.max(initial=0) > len(card.labels):
            found = ", ".join(f"{v:.6g}" for v in np.unique(known)[:20])
            raise InputImageError(f"The label map of '{name}' has values {found}; the model's labels are 0 "
                                  f"(background) and {', '.join(f'{v} {n}' for v, n in card.label_names().items())}"
                                  + (f" ({UNREVIEWED}: not reviewed)" if partial else ""))
        if not reviewed.any():
            raise InputImageError(f"The label map of '{name}' has no reviewed voxel: nothing to learn from")
        if require_foreground and not known.any():
            raise InputImageError(f"The label map of '{name}' is empty (background only): nothing to learn from")
        label = resize_labels(np.where(reviewed, values, 0).astype(np.uint8), grid.model_shape,
                              len(card.labels) + 1)
        if not reviewed.all():
            kept = resize_labels(reviewed.astype(np.uint8), grid.model_shape, 2).astype(bool)
            label[~kept] = UNREVIEWED
    return Case(name, volume, label, grid)
