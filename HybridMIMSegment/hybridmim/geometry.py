"""Exact mapping between a volume's voxel grid and the model's grid.

The model always sees voxels in one canonical axis order (index axes along +x, +y, +z of LPS space), at the card's
target spacing. Reorientation is a pure permutation/flip of the voxel array, so it is undone exactly; resampling
is only done when the spacing differs from the target, and results are resampled back onto the input's own grid.
Output labelmaps therefore always have the input's size, spacing, origin and direction, oblique ones included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

SPACING_TOLERANCE = 0.02  # relative spacing difference below which no resampling is done


@dataclass(frozen=True)
class Reorientation:
    """Canonical axis k takes source index axis ``perm[k]``, reversed when ``flip[k]``."""

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    @classmethod
    def from_direction(cls, direction: Sequence[float]) -> Reorientation:
        """Pair each index axis with the world axis it points along most (greedy on |cosine|)."""
        matrix = np.asarray(direction, dtype=float).reshape(3, 3)  # column i: world direction of index axis i
        perm = [-1, -1, -1]
        flip = [False, False, False]
        used_index_axes: set[int] = set()
        for flat in np.argsort(-np.abs(matrix), axis=None):
            world, index = divmod(int(flat), 3)
            if perm[world] == -1 and index not in used_index_axes:
                perm[world] = index
                flip[world] = bool(matrix[world, index] < 0)
                used_index_axes.add(index)
        return cls(tuple(perm), tuple(flip))

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Source (..., i, j, k) array -> canonical array. Leading axes (channels) are kept."""
        lead = array.ndim - 3
        array = np.transpose(array, (*range(lead), *(lead + p for p in self.perm)))
        flips = tuple(lead + k for k in range(3) if self.flip[k])
        return np.flip(array, flips) if flips else array

    def invert(self, array: np.ndarray) -> np.ndarray:
        """Canonical array -> source (..., i, j, k) array."""
        lead = array.ndim - 3
        flips = tuple(lead + k for k in range(3) if self.flip[k])
        if flips:
            array = np.flip(array, flips)
        inverse = np.argsort(self.perm)
        return np.transpose(array, (*range(lead), *(lead + int(p) for p in inverse)))

    def spacing(self, spacing: Sequence[float]) -> tuple[float, float, float]:
        return tuple(float(spacing[p]) for p in self.perm)


@dataclass(frozen=True)
class ModelGrid:
    """How a volume maps to the model grid: reorientation, canonical shape, and shape at the target spacing."""

    reorientation: Reorientation
    canonical_shape: tuple[int, int, int]
    model_shape: tuple[int, int, int]

    @property
    def resampled(self) -> bool:
        return self.canonical_shape != self.model_shape


def model_grid(image: sitk.Image, target_spacing: Sequence[float] | None) -> ModelGrid:
    reorientation = Reorientation.from_direction(image.GetDirection())
    shape = tuple(int(image.GetSize()[p]) for p in reorientation.perm)
    if target_spacing is None:
        return ModelGrid(reorientation, shape, shape)
    spacing = reorientation.spacing(image.GetSpacing())
    if all(abs(s - t) <= SPACING_TOLERANCE * t for s, t in zip(spacing, target_spacing)):
        return ModelGrid(reorientation, shape, shape)
    model_shape = tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target_spacing))
    return ModelGrid(reorientation, shape, model_shape)


def image_to_canonical(image: sitk.Image, grid: ModelGrid) -> np.ndarray:
    """Voxel array (i, j, k order) of ``image`` in canonical axis order, not yet resampled."""
    return grid.reorientation.apply(sitk.GetArrayViewFromImage(image).transpose(2, 1, 0))


def resize(volume: torch.Tensor, shape: Sequence[int], mode: str = "trilinear") -> torch.Tensor:
    """Resize a (C, X, Y, Z) tensor to ``shape``; ``mode='nearest'`` for label maps."""
    if tuple(volume.shape[-3:]) == tuple(shape):
        return volume
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    return F.interpolate(volume[None].float(), size=tuple(shape), mode=mode, **kwargs)[0]


def resized_argmax(scores: torch.Tensor, shape: Sequence[int], chunk_voxels: int = 1 << 22) -> np.ndarray:
    """uint8 argmax over classes of (C, X, Y, Z) ``scores`` resized to ``shape`` (trilinear, same sampling as
    ``resize``), computed in slabs along the last axis so no full-resolution float map is ever held."""
    shape = tuple(int(n) for n in shape)
    labels = np.empty(shape, np.uint8)
    step = max(1, chunk_voxels // (shape[0] * shape[1]))
    if tuple(scores.shape[1:]) == shape:
        for start in range(0, shape[2], step):
            labels[..., start:start + step] = scores[..., start:start + step].argmax(0).numpy()
        return labels

    def centres(count: int) -> torch.Tensor:  # grid_sample coordinates of output voxel centres, align_corners=False
        return (torch.arange(count, dtype=torch.float32) + 0.5) / count * 2 - 1

    x, y, z = (centres(n) for n in shape)
    source = scores[None].float()
    for start in range(0, shape[2], step):
        gx, gy, gz = torch.meshgrid(x, y, z[start:start + step], indexing="ij")
        grid = torch.stack([gz, gy, gx], -1)[None]  # grid_sample's (x, y, z) index the input's (W, H, D) = (Z, Y, X)
        slab = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)
        labels[..., start:start + step] = slab[0].argmax(0).numpy()
    return labels


def labels_to_image(labels_canonical: np.ndarray, grid: ModelGrid, reference: sitk.Image) -> sitk.Image:
    """Canonical uint8 label array -> labelmap image with exactly the reference volume's geometry."""
    labels = np.ascontiguousarray(grid.reorientation.invert(labels_canonical).transpose(2, 1, 0))
    labelmap = sitk.GetImageFromArray(labels.astype(np.uint8))
    labelmap.CopyInformation(reference)
    return labelmap
