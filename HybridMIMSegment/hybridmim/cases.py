"""Image/label pairs brought onto the model grid exactly as inference sees images (training, fine-tuning,
evaluation all use this, so what a model learns is what it is later shown)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from .errors import InputImageError
from .geometry import ModelGrid, image_to_canonical, model_grid, resize
from .imageio import read_volume
from .model_card import ModelCard
from .preprocessing import normalize_intensity


@dataclass
class Case:
    """``image``: (1, X, Y, Z) float32 normalised; ``label``: (X, Y, Z) uint8 or None, both on the model grid."""

    name: str
    image: np.ndarray
    label: np.ndarray | None
    grid: ModelGrid


def same_geometry(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=tolerance, atol=tolerance)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=tolerance, atol=tolerance * 10)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance))


def load_case(card: ModelCard, image_path: str | os.PathLike, label_path: str | os.PathLike | None = None,
              name: str | None = None) -> Case:
    image = read_volume(image_path)
    grid = model_grid(image, card.target_spacing)
    volume = normalize_intensity(image_to_canonical(image, grid), card.intensity)
    volume = resize(torch.from_numpy(volume)[None], grid.model_shape).numpy()
    label = None
    if label_path is not None:
        label_image = read_volume(label_path)
        if not same_geometry(image, label_image):
            raise InputImageError(f"Label {label_path} does not have the geometry of image {image_path} "
                                  f"(size/spacing/origin/direction differ)")
        values = image_to_canonical(label_image, grid)
        if np.any(values != np.round(values)) or values.min() < 0 or values.max() > len(card.labels):
            raise InputImageError(f"Label {label_path} has values outside 0..{len(card.labels)} "
                                  f"({', '.join(card.label_names().values())})")
        label = resize(torch.from_numpy(values.astype(np.uint8))[None], grid.model_shape, "nearest")[0]
        label = label.numpy().astype(np.uint8)
    return Case(name or os.path.basename(str(image_path)).split(".")[0], volume, label, grid)
