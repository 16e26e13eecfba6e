"""PNG preview: a few axial slices of the volume with the labelmap overlaid, for a quick look without Slicer."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

from .errors import OutputError
from .model_card import Label

TILE = 256


def write_preview(volume: sitk.Image, labelmap: sitk.Image, labels: Sequence[Label], path: str | os.PathLike,
                  slices: int = 4, opacity: float = 0.5) -> Path:
    """Axial slices through the labelled extent (evenly through the volume when nothing was found)."""
    image = sitk.GetArrayFromImage(volume).astype(np.float32)  # (k, j, i)
    label = sitk.GetArrayFromImage(labelmap)
    rows = np.flatnonzero(label.reshape(label.shape[0], -1).any(1))
    first, last = (rows[0], rows[-1]) if len(rows) else (0, label.shape[0] - 1)
    low, high = np.percentile(image[np.isfinite(image)], (1, 99))
    colours = np.zeros((256, 3), np.float32)
    for item in labels:
        colours[item.value] = item.color
    aspect = volume.GetSpacing()[1] / volume.GetSpacing()[0]
    tiles = []
    for k in np.linspace(first, last, slices + 2)[1:-1].round().astype(int):
        grey = np.clip((image[k] - low) / max(high - low, 1e-6), 0, 1)[..., None].repeat(3, -1)
        mask = label[k] > 0
        grey[mask] = (1 - opacity) * grey[mask] + opacity * colours[label[k][mask]]
        tile = Image.fromarray((grey * 255).astype(np.uint8))
        height = max(1, round(TILE * tile.height * aspect / tile.width))
        tiles.append(tile.resize((TILE, height), Image.Resampling.NEAREST))
    canvas = Image.new("RGB", (TILE * len(tiles), max(t.height for t in tiles)))
    for index, tile in enumerate(tiles):
        canvas.paste(tile, (index * TILE, 0))
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(path)
    except OSError as error:
        path.unlink(missing_ok=True)
        raise OutputError(f"Cannot write the preview {path}: {error}") from error
    return path
