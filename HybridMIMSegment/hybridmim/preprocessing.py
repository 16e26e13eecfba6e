"""Intensity normalisation per model card: the only place raw voxel values are turned into network input."""

from __future__ import annotations

import numpy as np

from .model_card import Intensity


def normalize_intensity(volume: np.ndarray, intensity: Intensity) -> np.ndarray:
    """Return a float32 copy of ``volume`` normalised as the card says; non-finite voxels become the minimum."""
    volume = np.asarray(volume, dtype=np.float32).copy()
    finite = np.isfinite(volume)
    if not finite.all():
        volume[~finite] = volume[finite].min() if finite.any() else 0.0
    if intensity.method == "ct_window":
        low, high = intensity.window
        return (np.clip(volume, low, high) - low) / float(high - low)
    if intensity.method == "percentile":
        low, high = np.percentile(volume, intensity.percentiles or (0.5, 99.5))
        return (np.clip(volume, low, high) - low) / float(max(high - low, 1e-6))
    mean, std = float(volume.mean()), float(volume.std())
    return (volume - mean) / max(std, 1e-6)
