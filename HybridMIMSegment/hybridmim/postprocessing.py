"""Label clean-up after inference: keep only the largest connected piece of structures that are one piece.

Stray islands far from the structure cost little Dice but dominate the surface distance (la-cnn on its 16
held-out cases: Dice 0.890 -> 0.894, HD95 5.73 -> 3.75 mm). Whether a structure is one piece is read from
labelled volumes (training or the user's corrections), never assumed: a label such as "both kidneys" keeps
all its pieces.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import SimpleITK as sitk

SINGLE_PIECE_SHARE = 0.9  # a label is one piece when its largest 26-connected part holds this share of its voxels


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The mask's bounding box (connected components are computed inside it only: far less memory on CT)."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _components(mask: np.ndarray) -> np.ndarray:
    """26-connected components of a boolean array, numbered by decreasing size (1 = largest, 0 = outside)."""
    parts = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True)
    return sitk.GetArrayFromImage(sitk.RelabelComponent(parts, sortByObjectSize=True))


def largest_piece_share(labels: np.ndarray, value: int) -> float | None:
    """Share of ``value``'s voxels in its largest connected piece; None when the value is absent."""
    mask = labels == value
    box = _bounding_box(mask)
    if box is None:
        return None
    sizes = np.bincount(_components(mask[box]).ravel())[1:]
    return float(sizes[0] / sizes.sum())


def single_piece_labels(label_arrays: Sequence[np.ndarray], values: Iterable[int],
                        share: float = SINGLE_PIECE_SHARE) -> list[int]:
    """The label values that are one piece in every labelled array where they occur (and occur at least once)."""
    single = []
    for value in values:
        shares = [s for s in (largest_piece_share(labels, value) for labels in label_arrays) if s is not None]
        if shares and min(shares) >= share:
            single.append(int(value))
    return single


def keep_largest_pieces(labels: np.ndarray, values: Iterable[int]) -> bool:
    """Set every piece of each of ``values`` but its largest to background, in place; True if anything changed."""
    changed = False
    for value in values:
        mask = labels == value
        box = _bounding_box(mask)
        if box is None:
            continue
        stray = _components(mask[box]) > 1
        if stray.any():
            labels[box][stray] = 0
            changed = True
    return changed


def keep_largest_component(labelmap: sitk.Image, values: Iterable[int]) -> sitk.Image:
    """``labelmap`` with every piece of each of ``values`` but its largest set to background; geometry kept."""
    values = list(values)
    if not values:
        return labelmap
    labels = sitk.GetArrayFromImage(labelmap)
    if not keep_largest_pieces(labels, values):
        return labelmap
    result = sitk.GetImageFromArray(labels)
    result.CopyInformation(labelmap)
    return result
