"""Intensity normalisation per model card, and the one function that turns a volume into network input."""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
import torch

from .errors import InputImageError
from .geometry import ModelGrid, model_grid, resize
from .imageio import available_memory
from .model_card import Intensity, ModelCard

HU_WINDOW = (-1000.0, 1000.0)  # the "auto" method's CT window
HU_AIR_BELOW = -500.0  # a volume with values this low is CT in Hounsfield units (air is -1000 HU, MRI is >= 0)


MAX_MODEL_VOXELS = 1024**3 // 2  # beyond this a volume resampled to the model's spacing cannot be held in memory
# float32 arrays on the model grid while a volume is segmented or prepared for training: the input, its resampled and
# normalised copies, and one class-score map per output channel.
ARRAYS_BESIDES_CLASSES = 3


def checked_model_grid(image: sitk.Image, card: ModelCard) -> ModelGrid:
    """The card's model grid for ``image``, refused before anything is allocated when its arrays cannot fit in
    memory: coarse volumes are upsampled (a 256^3 volume of 3 mm voxels is 768^3 at 1 mm)."""
    grid = model_grid(image, card.target_spacing)
    voxels = math.prod(grid.model_shape)
    needed = 4 * voxels * (ARRAYS_BESIDES_CLASSES + card.out_channels)
    available = available_memory()
    if voxels > MAX_MODEL_VOXELS or (available is not None and needed > available):
        size = "x".join(map(str, grid.model_shape))
        raise InputImageError(f"At the model's spacing {card.target_spacing} mm this volume would be {size} "
                              f"voxels, about {needed / 2**30:.1f} GiB of working memory "
                              f"({(available or 0) / 2**30:.1f} GiB available); check the spacing in its header "
                              f"({image.GetSpacing()} mm)")
    return grid


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
    clip_outliers(volume)
    mean, std = float(volume.mean(dtype=np.float64)), float(volume.std(dtype=np.float64))
    return ((volume - mean) / (std if std > 0 else 1.0)).astype(np.float32, copy=False)


OUTLIER_SPANS = 10  # how far past the bulk of the intensities a voxel may lie before it is clipped
STATISTICS_SAMPLE = 1 << 20  # voxels sampled (evenly) to find the bulk


def even_sample(array: np.ndarray) -> np.ndarray:
    """About ``STATISTICS_SAMPLE`` voxels taken evenly through ``array``, as float64, for robust statistics."""
    return array.ravel()[::max(1, array.size // STATISTICS_SAMPLE)].astype(np.float64)


def clip_outliers(volume: np.ndarray) -> None:
    """Clip, in place, voxels more than ``OUTLIER_SPANS`` times the 0.1-99.9 percentile span outside it. A
    single corrupt voxel at 3e38 would otherwise dominate the mean and spread and leave every other voxel at
    about 0 (empty labels); real intensities never lie that far out, so normal volumes are unchanged."""
    sample = even_sample(volume)
    low, high = np.percentile(sample, (0.1, 99.9))
    span = high - low
    if span > 0:
        np.clip(volume, low - OUTLIER_SPANS * span, high + OUTLIER_SPANS * span, out=volume)


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


SHIFT_FREE_METHODS = ("zscore", "percentile")  # normalisations a constant offset does not change


def as_float32(array: np.ndarray, shift_free: bool) -> np.ndarray:
    """float32 copy of the voxels. 64-bit voxels far from 0 (int64 values around 1e18, say) lose every detail in
    float32; when the normalisation ignores offsets they are first centred on their median, slice by slice."""
    if not shift_free or array.dtype.itemsize < 8:
        return np.array(array, dtype=np.float32)
    sample = even_sample(array)
    finite = sample[np.isfinite(sample)]
    centre = float(np.median(finite)) if finite.size else 0.0
    out = np.empty(array.shape, np.float32)
    for k in range(array.shape[0]):
        out[k] = array[k].astype(np.float64) - centre
    return out


def model_input(image: sitk.Image, grid: ModelGrid, intensity: Intensity) -> np.ndarray:
    """(1, X, Y, Z) float32 network input on the model grid.

    Resampling comes first and runs in the file's own memory order, so a large volume is read once, sequentially,
    and everything after it (reorientation, normalisation statistics) works on the smaller model-grid array, as in
    MONAI's Spacing -> NormalizeIntensity. Trilinear resizing commutes with axis permutations and flips, so this is
    the same sampling as reorienting first.
    """
    array = sitk.GetArrayViewFromImage(image)  # (k, j, i): index axes reversed
    volume = torch.from_numpy(as_float32(array, shift_free=intensity.method in SHIFT_FREE_METHODS))
    if not np.issubdtype(array.dtype, np.integer):
        replace_non_finite(volume.numpy())
    perm = grid.reorientation.perm
    source_shape = [0, 0, 0]
    for canonical_axis, source_axis in enumerate(perm):
        source_shape[source_axis] = grid.model_shape[canonical_axis]
    resized = resize(volume[None], source_shape[::-1])[0].numpy()
    del volume  # the unresized input is not needed below (large volumes)
    canonical = grid.reorientation.apply(resized.transpose(2, 1, 0))
    return normalize_intensity(canonical, intensity)[None]
