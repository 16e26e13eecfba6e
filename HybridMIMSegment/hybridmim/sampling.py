"""Random training patches from cases held in memory: foreground-biased crops, rotation/scaling, flips, quarter
turns, intensity jitter, gamma and Gaussian noise. Used by fine-tuning in the engine and by the offline training
package alike."""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import EllipsisType

import numpy as np
import torch
import torch.nn.functional as F

from hybridmim.cases import Case
from hybridmim.errors import HybridMIMError
from hybridmim.partial import UNREVIEWED


def random_start(extent: int, size: int, rng: np.random.Generator) -> int:
    """Uniform crop start along one axis; outside the volume when it is smaller than the crop, so the volume lands
    anywhere inside the crop."""
    return int(rng.integers(min(0, extent - size), max(0, extent - size) + 1))


def padded_crop(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``array[..., start:start+size]`` over the last three axes, with zeros where the window leaves the volume
    (as sliding-window inference pads)."""
    out = np.zeros((*array.shape[:-3], *size), array.dtype)
    source: list[slice] = []
    target: list[slice] = []
    for begin, length, extent in zip(start, size, array.shape[-3:]):
        first, last = max(begin, 0), min(begin + length, extent)
        source.append(slice(first, last))
        target.append(slice(first - begin, last - begin))
    target_index: tuple[EllipsisType | slice, ...] = (..., *target)
    source_index: tuple[EllipsisType | slice, ...] = (..., *source)
    out[target_index] = array[source_index]
    return out


def labelled_voxels(label: np.ndarray | None) -> list[np.ndarray]:
    """Per label the volume holds, the (N, 3) indices of its voxels (none for an unlabelled volume)."""
    if label is None:
        return []
    values = [int(v) for v in np.unique(label) if v not in (0, UNREVIEWED)]
    return [np.argwhere(label == value) for value in values]


class PatchSampler:
    """Draws (image, label) batches of a fixed patch size from cases; for unlabelled cases (``label`` None) the
    label batch is None.

    Crops may reach past the volume's edges (zero-filled, as sliding-window inference pads), so a volume smaller
    than the patch appears at random positions: a network that only ever saw it in one corner learns that corner.
    With probability ``foreground_probability`` a crop is centred on a labelled voxel of a label drawn uniformly
    among those the volume holds (as nnU-Net oversamples: a random labelled voxel would nearly always be liver,
    rarely a kidney); crops of a partly corrected volume are always centred on a reviewed voxel (elsewhere there
    may be nothing to learn).
    """

    def __init__(self, cases: Sequence[Case], patch_size: Sequence[int], seed: int,
                 flip_axes: Sequence[int] = (), foreground_probability: float = 0.33,
                 intensity_jitter: float = 0.1, rotation_degrees: float = 0.0, rotation_axes: Sequence[int] = (0, 1, 2),
                 scale_range: Sequence[float] = (1, 1),
                 spatial_probability: float = 0.0, gamma_probability: float = 0.0,
                 gamma_range: Sequence[float] = (0.7, 1.5), noise_probability: float = 0.0,
                 noise_variance: float = 0.1, rot90_axis: int | None = None) -> None:
        self.patch = tuple(int(p) for p in patch_size)
        self.rot90_plane = None if rot90_axis is None else tuple(a for a in range(3) if a != rot90_axis)
        if self.rot90_plane is not None and len({self.patch[a] for a in self.rot90_plane}) > 1:
            raise HybridMIMError(f"Quarter turns about axis {rot90_axis} need equal patch sides across it, not "
                                 f"{self.patch}")
        self.rotation_degrees = rotation_degrees
        self.rotation_axes = sorted(2 - axis for axis in rotation_axes)  # affine_grid's axes are (Z, Y, X)
        # scaling stays in the planes rotated in (all axes when rotating about all three or none)
        planes = {a for k in self.rotation_axes for a in range(3) if a != k} or {0, 1, 2}
        self.scaled = torch.tensor([a in planes for a in range(3)])
        self.scale_range = tuple(scale_range)
        self.spatial_probability = spatial_probability
        self.rng = np.random.default_rng(seed)
        self.flip_axes = tuple(flip_axes)
        self.foreground_probability = foreground_probability
        self.intensity_jitter = intensity_jitter
        self.gamma_probability, self.gamma_range = gamma_probability, tuple(gamma_range)
        self.noise_probability, self.noise_variance = noise_probability, noise_variance
        self.cases = [(case.image, case.label) for case in cases]
        self.labelled = all(label is not None for _, label in self.cases)
        if not self.labelled and any(label is not None for _, label in self.cases):
            raise ValueError("PatchSampler: mix of labelled and unlabelled cases; use one sampler for each")
        self.foreground = [labelled_voxels(label) for _, label in self.cases]
        self.reviewed = [np.flatnonzero(label != UNREVIEWED) if label is not None and np.any(label == UNREVIEWED)
                         else None for _, label in self.cases]
        self.partial = any(reviewed is not None for reviewed in self.reviewed)

    def _crop_start(self, index: int) -> list[int]:
        """Start of a crop; may lie outside the volume (negative, or past the end when the volume is smaller
        than the patch), so the volume lands anywhere in the patch, not always in one corner."""
        shape = self.cases[index][0].shape[1:]
        low = [min(0, s - p) for s, p in zip(shape, self.patch)]
        high = [max(0, s - p) for s, p in zip(shape, self.patch)]
        foreground = self.foreground[index]
        if foreground and self.rng.random() < self.foreground_probability:
            voxels = foreground[int(self.rng.integers(len(foreground)))] if len(foreground) > 1 else foreground[0]
            centre = voxels[self.rng.integers(len(voxels))]
        elif (reviewed := self.reviewed[index]) is not None:
            centre = np.unravel_index(reviewed[self.rng.integers(len(reviewed))], shape)
        else:
            return [random_start(s, p, self.rng) for s, p in zip(shape, self.patch)]
        return [int(np.clip(c - p // 2, lo, hi)) for c, p, lo, hi in zip(centre, self.patch, low, high)]

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        index = int(self.rng.integers(len(self.cases)))
        image, label = self.cases[index]
        if label is None:
            label = np.zeros(image.shape[1:], np.uint8)
        start = self._crop_start(index)
        image, label = padded_crop(image, start, self.patch), padded_crop(label, start, self.patch)
        for axis in self.flip_axes:
            if self.rng.random() < 0.5:
                image, label = np.flip(image, axis + 1), np.flip(label, axis)
        if self.intensity_jitter:
            scale = 1.0 + self.intensity_jitter * self.rng.standard_normal()
            shift = self.intensity_jitter * self.rng.standard_normal()
            image = image * scale + shift
        if self.rng.random() < self.gamma_probability:
            image = self._gamma(image)
        if self.rng.random() < self.noise_probability:
            sigma = math.sqrt(self.rng.uniform(0, self.noise_variance))
            image = image + self.rng.normal(0, sigma, image.shape)
        if self.rot90_plane is not None:
            turns, (first, second) = int(self.rng.integers(4)), self.rot90_plane
            image, label = np.rot90(image, turns, (first + 1, second + 1)), np.rot90(label, turns, (first, second))
        return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label)

    def _gamma(self, image: np.ndarray) -> np.ndarray:
        """Gamma on the patch's intensities mapped to [0, 1], then its mean and spread restored (nnU-Net's
        gamma augmentation): changes contrast between tissues, not overall brightness."""
        low, span = float(image.min()), float(np.ptp(image))
        if span == 0:
            return image
        gamma = self.rng.uniform(self.gamma_range[0], 1.0) if self.rng.random() < 0.5 else \
            self.rng.uniform(1.0, self.gamma_range[1])
        mean, std = image.mean(), image.std()
        out = ((image - low) / span) ** gamma * span + low
        out_std = out.std()
        return (out - out.mean()) * (std / out_std if out_std > 0 else 1.0) + mean

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 1, *patch) float32 images and (B, 1, *patch) int64 labels (None for unlabelled cases)."""
        images, labels = zip(*(self.sample() for _ in range(size)))
        images = torch.from_numpy(np.stack(images))
        labels = torch.from_numpy(np.stack(labels)[:, None].astype(np.int64))
        chosen = [i for i in range(size) if self.rng.random() < self.spatial_probability]
        if chosen:
            images[chosen], labels[chosen] = self._rotate_and_scale(images[chosen], labels[chosen])
        return images, labels if self.labelled else None

    def _rotate_and_scale(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Random rotation about ``rotation_axes`` and scaling in the planes rotated in (thick-slice data: only about
        and across the slice axis, so slices are not mixed) around the patch centre, in voxel space
        (so non-cubic patches are not sheared); labels resampled with nearest neighbour, outside filled with 0."""
        count = images.shape[0]
        half = torch.tensor(self.patch[::-1], dtype=torch.float64) / 2  # affine_grid's x, y, z are W, H, D
        thetas = []
        for _ in range(count):
            rotation = torch.eye(3, dtype=torch.float64)
            for axis in self.rotation_axes:
                angle = math.radians(self.rng.uniform(-self.rotation_degrees, self.rotation_degrees))
                c, s = math.cos(angle), math.sin(angle)
                i, j = [k for k in range(3) if k != axis]
                step = torch.eye(3, dtype=torch.float64)
                step[i, i], step[i, j], step[j, i], step[j, j] = c, -s, s, c
                rotation = step @ rotation
            factor = self.rng.uniform(self.scale_range[0], self.scale_range[1])
            rotation = rotation @ torch.diag(torch.where(self.scaled, 1 / factor, 1.0).double())
            thetas.append(torch.diag(1 / half) @ rotation @ torch.diag(half))
        theta = torch.cat([torch.stack(thetas), torch.zeros(count, 3, 1, dtype=torch.float64)], 2).float()
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        labels = F.grid_sample(labels.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        return images, labels.long()
