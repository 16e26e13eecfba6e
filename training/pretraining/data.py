"""Unlabelled volumes for pre-training: sources from dataset.json lists or folders (CT and MRI mixed), each
normalised to [0, 1] its own way, resampled once to a common grid and cached; random crops drawn per step from a
seed, the rank and the step number, so every rank sees different crops and a resumed run sees the same ones.

Volumes are drawn in proportion to their number of voxels (a 35 x 50 x 35 mm hippocampus crop is not drawn as often
as a whole CT), each crop comes with its validity mask (1 inside the volume, 0 in padding), and a crop with little
real content is redrawn."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from hybridmim.cases import LabeledVolume
from hybridmim.geometry import model_grid
from hybridmim.imageio import LABELMAP_SUFFIXES, read_volume
from hybridmim.model_card import Intensity
from hybridmim.preprocessing import HU_WINDOW, model_input
from hybridmim.sampling import padded_crop, random_start

from ..datalist import dataset_modality, read_datalist

logger = logging.getLogger(__name__)

VOLUME_SUFFIXES = tuple(s for s in LABELMAP_SUFFIXES if s != ".seg.nrrd")  # the formats the engine writes
CACHE_VERSION = 2  # 2: resampled before normalisation, by the engine's model_input


def volume_file(path: Path, modality: str) -> LabeledVolume:
    """A pre-training volume: named by its path (unique, and what the seeded split sorts on), no label."""
    return LabeledVolume(str(path), Path(path), None, modality)


def sources_from_datalist(dataset_json: Path, keys: tuple[str, ...] = ("training", "test")) -> list[LabeledVolume]:
    """Images of an MSD-style list (labels unused); modality from its "modality" entry."""
    info = json.loads(Path(dataset_json).read_text(encoding="utf-8"))
    modality = dataset_modality(info) or "MRI"
    sources = []
    for key in keys:
        if key in info:
            sources += [volume_file(Path(case.image), modality) for case in read_datalist(dataset_json, key)]
    return sources


def sources_from_folder(folder: Path, modality: str) -> list[LabeledVolume]:
    """Every volume file below ``folder`` (Slicer segmentation files excluded)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)
                   and not p.name.lower().endswith(".seg.nrrd"))
    return [volume_file(p, modality.upper()) for p in files]


def intensity_of(modality: str) -> Intensity:
    """CT sources: the HU window when in Hounsfield units, else percentiles ("auto", which the exported card
    keeps for fine-tuning); MRI: always percentiles, 0.5th-99.5th to [0, 1]."""
    return Intensity("auto" if modality == "CT" else "percentile", list(HU_WINDOW), [0.5, 99.5])


def cached_volume(source: LabeledVolume, spacing: list[float], cache_dir: Path) -> Path:
    """Canonically oriented, resampled, normalised float16 copy of a volume file in ``cache_dir`` (made once)."""
    file, modality = Path(source.image), source.modality or "MRI"
    stat = file.stat()
    key = json.dumps([str(file.resolve()), stat.st_size, stat.st_mtime_ns, modality, spacing, CACHE_VERSION])
    path = Path(cache_dir) / f"{hashlib.sha1(key.encode()).hexdigest()}.npy"
    if path.is_file():
        return path
    image = read_volume(file)
    grid = model_grid(image, spacing)
    volume = model_input(image, grid, intensity_of(modality))[0].astype(np.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(suffix=".npy", dir=path.parent)
    with os.fdopen(handle, "wb") as stream:
        np.save(stream, volume)
    os.replace(staging, path)
    logger.info("cached %s %s -> %s", file.name, volume.shape, path.name)
    return path


CONTENT_THRESHOLD = 0.1  # normalised intensity above which a voxel counts as content (air, background: below)
MIN_CONTENT = 0.25  # share of a crop's voxels that should be content
CROP_TRIES = 8


def crop_validity(shape: tuple[int, ...], start: list[int], size: int) -> np.ndarray:
    """(size, size, size) float32: 1 where the crop starting at ``start`` lies inside a volume of ``shape``."""
    valid = np.zeros((size, size, size), np.float32)
    inside = tuple(slice(max(0, -begin), min(size, extent - begin)) for begin, extent in zip(start, shape))
    valid[inside] = 1.0
    return valid


def random_crop(volume: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A size^3 float32 crop at a random position and its validity mask; volumes smaller than the crop land at a
    random place, zero-padded. Redrawn up to ``CROP_TRIES`` times while less than ``MIN_CONTENT`` of it (or of what
    the volume can fill) is content; the crop with the most content is kept."""
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    reachable = float(np.prod([min(extent, size) for extent in volume.shape])) / size**3
    for _ in range(CROP_TRIES):
        start = [random_start(extent, size, rng) for extent in volume.shape]
        crop = padded_crop(volume, start, (size, size, size)).astype(np.float32)
        content = float((crop > CONTENT_THRESHOLD).mean())
        if best is None or content > best[0]:
            best = (content, crop, crop_validity(volume.shape, start, size))
        if content >= MIN_CONTENT * min(1.0, reachable):
            break
    assert best is not None
    return best[1], best[2]


class StepCrops(Dataset):
    """Item i is the batch of step ``first_step + i`` for one rank: ``volumes_per_step`` volumes drawn in proportion
    to their voxels, ``crops_per_volume`` crops each, as (crops, validity), both (N, 1, s, s, s). Deterministic in
    (seed, rank, step): resuming at step k reproduces the batches of the original run, and DataLoader workers may
    build them in any order."""

    def __init__(self, cached: list[Path], crop_size: int, volumes_per_step: int, crops_per_volume: int,
                 seed: int, rank: int, first_step: int, total_steps: int) -> None:
        if not cached:
            raise ValueError("No volumes to pre-train on")
        self.cached, self.crop_size = cached, crop_size
        self.volumes_per_step, self.crops_per_volume = volumes_per_step, crops_per_volume
        self.seed, self.rank, self.first_step, self.total_steps = seed, rank, first_step, total_steps
        voxels = np.array([np.prod(np.load(path, mmap_mode="r").shape) for path in cached], np.float64)
        self.probabilities = voxels / voxels.sum()

    def __len__(self) -> int:
        return max(0, self.total_steps - self.first_step)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, self.first_step + index])
        # with replacement, so that the shares follow the sizes; crops of one volume are negatives of each other
        # anyway (crops_per_volume)
        chosen = rng.choice(len(self.cached), self.volumes_per_step, p=self.probabilities)
        crops = []
        for volume_index in chosen:
            volume = np.load(self.cached[volume_index], mmap_mode="r")
            crops += [random_crop(volume, self.crop_size, rng) for _ in range(self.crops_per_volume)]
        images, valid = (torch.from_numpy(np.stack(parts))[:, None] for parts in zip(*crops))
        return images, valid
