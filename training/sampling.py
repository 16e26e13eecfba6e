"""Random training patches from cases held in memory: foreground-biased crops, flips and intensity jitter."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from hybridmim.cases import Case


class PatchSampler:
    """Draws (image, label) batches of a fixed patch size from labelled cases.

    Volumes smaller than the patch are zero-padded, as sliding-window inference pads them. With probability
    ``foreground_probability`` a crop is centred on a random labelled voxel, so small structures are seen often.
    """

    def __init__(self, cases: Sequence[Case], patch_size: Sequence[int], seed: int,
                 flip_axes: Sequence[int] = (), foreground_probability: float = 0.33,
                 intensity_jitter: float = 0.1) -> None:
        self.patch = tuple(int(p) for p in patch_size)
        self.rng = np.random.default_rng(seed)
        self.flip_axes = tuple(flip_axes)
        self.foreground_probability = foreground_probability
        self.intensity_jitter = intensity_jitter
        self.cases = [self._pad(case) for case in cases]
        self.foreground = [np.argwhere(label > 0) for _, label in self.cases]

    def _pad(self, case: Case) -> tuple[np.ndarray, np.ndarray]:
        shape = case.image.shape[1:]
        pad = [(0, max(p - s, 0)) for s, p in zip(shape, self.patch)]
        image = np.pad(case.image, [(0, 0), *pad])
        label = np.pad(case.label, pad)
        return image, label

    def _crop_start(self, index: int) -> list[int]:
        image, _ = self.cases[index]
        shape = image.shape[1:]
        foreground = self.foreground[index]
        if len(foreground) and self.rng.random() < self.foreground_probability:
            centre = foreground[self.rng.integers(len(foreground))]
            return [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, self.patch, shape)]
        return [int(self.rng.integers(0, s - p + 1)) for p, s in zip(self.patch, shape)]

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        index = int(self.rng.integers(len(self.cases)))
        image, label = self.cases[index]
        x, y, z = self._crop_start(index)
        px, py, pz = self.patch
        image = image[:, x:x + px, y:y + py, z:z + pz]
        label = label[x:x + px, y:y + py, z:z + pz]
        for axis in self.flip_axes:
            if self.rng.random() < 0.5:
                image, label = np.flip(image, axis + 1), np.flip(label, axis)
        if self.intensity_jitter:
            scale = 1.0 + self.intensity_jitter * self.rng.standard_normal()
            shift = self.intensity_jitter * self.rng.standard_normal()
            image = image * scale + shift
        return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = zip(*(self.sample() for _ in range(size)))
        return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels)[:, None].astype(np.int64))
