"""Intensity normalisation per model card, and the one function that turns a volume into network input."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from .geometry import ModelGrid, resize
from .model_card import Intensity

HU_WINDOW = (-1000.0, 1000.0)  # the "auto" method's CT window
HU_AIR_BELOW = -500.0  # a volume with values this low is CT in Hounsfield units (air is -1000 HU, MRI is >= 0)


def normalize_intensity(volume: np.ndarray, intensity: Intensity) -> np.ndarray:
    """Return a float32 copy of ``volume`` normalised as the card says; non-finite voxels become the minimum.

    ``auto`` (pre-trained models, which see CT and MRI) windows CT in Hounsfield units and percentile-scales the
    rest, both to [0, 1]: the same input whether a model is pre-trained, fine-tuned or run.
    """
    volume = np.asarray(volume, dtype=np.float32).copy()
    replace_non_finite(volume)
    method = intensity.method
    if method == "auto":
        method = "ct_window" if volume.min() <= HU_AIR_BELOW else "percentile"
    if method == "ct_window":
        return _to_unit_range(volume, *(intensity.window or HU_WINDOW))
    if method == "percentile":
        return _to_unit_range(volume, *np.percentile(volume, intensity.percentiles or (0.5, 99.5)))
    mean, std = float(volume.mean()), float(volume.std())
    return (volume - mean) / max(std, 1e-6)


def _to_unit_range(volume: np.ndarray, low: float, high: float) -> np.ndarray:
    """[low, high] -> [0, 1] in float32 (numpy float64 bounds would otherwise promote the volume to float64)."""
    low, high = float(low), float(high)
    scaled = (np.clip(volume, low, high) - low) / max(high - low, 1e-6)
    return np.clip(scaled, 0.0, 1.0, out=scaled)


def replace_non_finite(volume: np.ndarray) -> None:
    """NaN and infinite voxels become the smallest finite value (0 if there is none), in place."""
    finite = np.isfinite(volume)
    if not finite.all():
        volume[~finite] = volume[finite].min() if finite.any() else 0.0


def model_input(image: sitk.Image, grid: ModelGrid, intensity: Intensity) -> np.ndarray:
    """(1, X, Y, Z) float32 network input on the model grid.

    Resampling comes first and runs in the file's own memory order, so a large volume is read once, sequentially,
    and everything after it (reorientation, normalisation statistics) works on the smaller model-grid array, as in
    MONAI's Spacing -> NormalizeIntensity. Trilinear resizing commutes with axis permutations and flips, so this is
    the same sampling as reorienting first.
    """
    array = sitk.GetArrayViewFromImage(image)  # (k, j, i): index axes reversed
    volume = torch.from_numpy(np.array(array, dtype=np.float32))
    if not np.issubdtype(array.dtype, np.integer):
        replace_non_finite(volume.numpy())
    perm = grid.reorientation.perm
    source_shape = [0, 0, 0]
    for canonical_axis, source_axis in enumerate(perm):
        source_shape[source_axis] = grid.model_shape[canonical_axis]
    volume = resize(volume[None], source_shape[::-1])[0].numpy()
    canonical = grid.reorientation.apply(volume.transpose(2, 1, 0))
    return normalize_intensity(canonical, intensity)[None]
