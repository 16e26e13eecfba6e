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
        return cls((perm[0], perm[1], perm[2]), (flip[0], flip[1], flip[2]))

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
        x, y, z = self.perm
        return float(spacing[x]), float(spacing[y]), float(spacing[z])


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
    x, y, z = reorientation.perm
    size = image.GetSize()
    shape = (int(size[x]), int(size[y]), int(size[z]))
    if target_spacing is None:
        return ModelGrid(reorientation, shape, shape)
    spacing = reorientation.spacing(image.GetSpacing())
    if all(abs(s - t) <= SPACING_TOLERANCE * t for s, t in zip(spacing, target_spacing)):
        return ModelGrid(reorientation, shape, shape)
    nx, ny, nz = (max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target_spacing))
    return ModelGrid(reorientation, shape, (nx, ny, nz))


def image_to_canonical(image: sitk.Image, grid: ModelGrid) -> np.ndarray:
    """Voxel array (i, j, k order) of ``image`` in canonical axis order, not yet resampled."""
    return grid.reorientation.apply(sitk.GetArrayViewFromImage(image).transpose(2, 1, 0))


def resize(volume: torch.Tensor, shape: Sequence[int], mode: str = "trilinear") -> torch.Tensor:
    """Resize a (C, X, Y, Z) tensor to ``shape`` (images; label maps go through ``resize_labels``)."""
    if tuple(volume.shape[-3:]) == tuple(shape):
        return volume
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    return F.interpolate(volume[None].float(), size=tuple(shape), mode=mode, **kwargs)[0]


UNDECIDED = 255  # cell marker in resized_argmax: its corners disagree (labels are < 255)
ONE_HOT_BYTES = 1 << 30  # above this, label maps are resized with nearest-exact instead of one-hot interpolation


def resize_labels(labels: np.ndarray, shape: Sequence[int], classes: int | None = None) -> np.ndarray:
    """A (X, Y, Z) label map resized so that it stays aligned with its image (resized by ``resize``): the argmax
    of the trilinearly interpolated one-hot maps, as nnU-Net does. PyTorch's legacy 'nearest' floors its source
    index and moves every label by about half a voxel. Where the one-hot maps would not fit ``ONE_HOT_BYTES``,
    'nearest-exact' (the same voxel centres as the images, no shift)."""
    shape = tuple(int(n) for n in shape)
    if tuple(labels.shape) == shape:
        return labels.astype(np.uint8, copy=False)
    classes = classes or int(labels.max()) + 1
    if classes * labels.size * 4 > ONE_HOT_BYTES:
        resized = F.interpolate(torch.from_numpy(labels.astype(np.uint8))[None, None].float(), size=shape,
                                mode="nearest-exact")
        return resized[0, 0].numpy().astype(np.uint8)
    one_hot = torch.stack([torch.from_numpy(np.asarray(labels == value)) for value in range(classes)]).float()
    return resized_argmax(one_hot, shape)


def resized_argmax(scores: torch.Tensor, shape: Sequence[int], chunk_voxels: int = 1 << 22) -> np.ndarray:
    """uint8 argmax over classes of (C, X, Y, Z) ``scores`` resized to ``shape`` (trilinear, same sampling as
    ``resize``), slab by slab so no full-resolution float map is ever held.

    A trilinear value is a convex combination of its cell's 8 corners, so where all 8 corners have the same argmax
    the resized argmax is that label too. Only voxels in cells whose corners disagree (near label boundaries) are
    interpolated; the rest are looked up. The result is the same as interpolating everything.
    """
    shape = tuple(int(n) for n in shape)
    labels = np.empty(shape, np.uint8)
    step = max(1, chunk_voxels // (shape[1] * shape[2]))  # slabs along the first axis: contiguous writes
    if tuple(scores.shape[1:]) == shape:
        for start in range(0, shape[0], step):
            labels[start:start + step] = class_argmax(scores[:, start:start + step]).numpy()
        return labels
    if scores.shape[0] >= UNDECIDED:
        raise ValueError(f"At most {UNDECIDED - 1} classes fit a uint8 labelmap, got {scores.shape[0]}")
    cells = uniform_cells(class_argmax(scores))
    source = scores[None].float()
    centres = [_sample_centres(n) for n in shape]
    corner = [_first_corner(c, n) for c, n in zip(centres, scores.shape[1:])]
    cells = cells.index_select(1, corner[1]).index_select(2, corner[2])
    for start in range(0, shape[0], step):
        slab = cells.index_select(0, corner[0][start:start + step])
        undecided = (slab == UNDECIDED).nonzero()
        if len(undecided):
            x, y, z = centres[0][start + undecided[:, 0]], centres[1][undecided[:, 1]], centres[2][undecided[:, 2]]
            points = torch.stack([z, y, x], -1).view(1, 1, 1, -1, 3)  # grid_sample's (x, y, z) index (Z, Y, X)
            values = F.grid_sample(source, points, mode="bilinear", padding_mode="border", align_corners=False)
            slab[undecided[:, 0], undecided[:, 1], undecided[:, 2]] = values[0, :, 0, 0].argmax(0).to(torch.uint8)
        labels[start:start + step] = slab.numpy()
    return labels


def class_argmax(scores: torch.Tensor) -> torch.Tensor:
    """uint8 argmax over the first (class) axis, first maximum on ties like ``torch.argmax``; one elementwise pass
    per class is several times faster than torch's strided reduction over a short first axis."""
    best = scores[0].clone()
    labels = torch.zeros(scores.shape[1:], dtype=torch.uint8)
    for value in range(1, scores.shape[0]):
        better = scores[value] > best
        labels.masked_fill_(better, value)
        best = torch.where(better, scores[value], best)
    return labels


def uniform_cells(labels: torch.Tensor) -> torch.Tensor:
    """For each voxel, the label shared by it and its +1 neighbours along every axis (the far faces repeat
    themselves), or UNDECIDED where they differ."""
    low = high = F.pad(labels[None, None].float(), (0, 1, 0, 1, 0, 1), mode="replicate")[0, 0].to(torch.uint8)
    for axis, size in enumerate(labels.shape):
        low = torch.minimum(low.narrow(axis, 0, size), low.narrow(axis, 1, size))
        high = torch.maximum(high.narrow(axis, 0, size), high.narrow(axis, 1, size))
    return torch.where(low == high, low, torch.full_like(low, UNDECIDED))


def _sample_centres(count: int) -> torch.Tensor:
    """grid_sample coordinates (align_corners=False) of ``count`` output voxel centres along one axis."""
    return (torch.arange(count, dtype=torch.float32) + 0.5) / count * 2 - 1


def _first_corner(coordinates: torch.Tensor, size: int) -> torch.Tensor:
    """Index of the lower corner of the input cell each coordinate samples, as grid_sample computes it."""
    position = (((coordinates + 1) * size - 1) / 2).clamp(0, size - 1)
    return position.floor().long()


def labels_on_grid(scores: torch.Tensor, grid: ModelGrid, reference: sitk.Image) -> sitk.Image:
    """(C, X, Y, Z) class scores on the model grid -> uint8 argmax labelmap with exactly the reference volume's
    size, spacing, origin and direction. Scores are reoriented back at model resolution (small), so the
    full-resolution labels are written once, already in the file's memory order."""
    labels = resized_argmax(_in_reference_order(scores, grid), reference.GetSize()[::-1])
    return _on_reference(labels, reference)


def values_on_grid(values: torch.Tensor, grid: ModelGrid, reference: sitk.Image) -> sitk.Image:
    """(X, Y, Z) values on the model grid -> float32 image with exactly the reference volume's geometry
    (trilinear, the same sampling as the images)."""
    resized = resize(_in_reference_order(values[None], grid), reference.GetSize()[::-1])[0]
    return _on_reference(resized.numpy().astype(np.float32), reference)


def _in_reference_order(scores: torch.Tensor, grid: ModelGrid) -> torch.Tensor:
    """(C, X, Y, Z) on the model grid -> (C, k, j, i) in the reference volume's axes, still at model resolution."""
    return torch.from_numpy(np.ascontiguousarray(grid.reorientation.invert(scores.numpy()).transpose(0, 3, 2, 1)))


def _on_reference(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image
