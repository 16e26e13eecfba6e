"""Partly corrected volumes: a user who corrected only some slices of a model's segmentation.

The label map the engine trains on then holds ``UNREVIEWED`` outside the reviewed slices: training leaves those
voxels out of the supervised loss and, once its averaged teacher exists, fills them with the teacher's confident
labels (never the reviewed ones). Which slices were reviewed is found by comparing the corrected segmentation with
the model's output it started from. Torch-free: Slicer's own process marks the slices with it too.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .errors import InputImageError

UNREVIEWED = 255  # label value of voxels the user did not review
ANISOTROPY = 1.5  # a volume whose coarsest spacing is this much above its finest is edited in its slice plane


def edit_axis(changed: np.ndarray, spacing_zyx: tuple[float, float, float]) -> int:
    """The array axis (z, y, x order) the user edited slices along: the thick-slice axis of an anisotropic volume
    (where people edit), otherwise the axis along which the changes occupy the smallest share of slices."""
    if max(spacing_zyx) >= ANISOTROPY * min(spacing_zyx):
        return int(np.argmax(spacing_zyx))
    shares = [np.any(changed, axis=tuple(a for a in range(3) if a != axis)).mean() for axis in range(3)]
    return int(np.argmin(shares))


def partly_reviewed(corrected: sitk.Image, original: sitk.Image, name: str = "the corrected segmentation",
                    axis: int | None = None) -> tuple[sitk.Image, int, int]:
    """``corrected`` with ``UNREVIEWED`` outside the slices where it differs from ``original`` (the model's
    segmentation the user started from). ``axis``: the image axis (0 = i, 1 = j, 2 = k) of the edited slices, or
    None to infer it (``edit_axis``). Returns the label map, the number of reviewed slices and of all slices."""
    if corrected.GetSize() != original.GetSize() or not all(
            np.allclose(a, b, atol=1e-3) for a, b in ((corrected.GetSpacing(), original.GetSpacing()),
                                                     (corrected.GetOrigin(), original.GetOrigin()),
                                                     (corrected.GetDirection(), original.GetDirection()))):
        raise InputImageError(f"'{name}' and the segmentation it was corrected from are not on the same grid "
                              "(size/spacing/origin/direction differ)")
    labels = sitk.GetArrayFromImage(corrected)
    changed = labels != sitk.GetArrayViewFromImage(original)
    if not changed.any():
        raise InputImageError(f"'{name}' is the same as the segmentation it was corrected from: no slice was edited")
    if np.any(labels == UNREVIEWED):
        raise InputImageError(f"'{name}' holds the value {UNREVIEWED}, which marks unreviewed voxels")
    x, y, z = (float(s) for s in corrected.GetSpacing())
    array_axis = edit_axis(changed, (z, y, x)) if axis is None else 2 - axis
    others = tuple(a for a in range(3) if a != array_axis)
    reviewed = np.any(changed, axis=others)
    shape = [1, 1, 1]
    shape[array_axis] = reviewed.size
    out = sitk.GetImageFromArray(np.where(reviewed.reshape(shape), labels, UNREVIEWED).astype(np.uint8))
    out.CopyInformation(corrected)
    return out, int(reviewed.sum()), int(reviewed.size)
