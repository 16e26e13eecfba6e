"""Judge a model on labelled volumes with the engine's own inference path, on each volume's original grid:
per-case Dice and HD95 per structure, and their means. Model cards, fine-tuning and offline evaluation use it."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from .cases import LabeledVolume, as_image
from .errors import InputImageError
from .inference import Segmenter
from .metrics import dice_per_label, hausdorff95
from .progress import CancelToken

logger = logging.getLogger(__name__)


def evaluate(segmenter: Segmenter, cases: Sequence[LabeledVolume], cancel: CancelToken | None = None) -> dict:
    """``{"cases": [row per case], "dice_mean": {structure: Dice, "mean": ...}, "hd95_mean_mm": {...}}``."""
    names = segmenter.card.label_names()
    rows = []
    for case in cases:
        if case.label is None:
            raise InputImageError(f"'{case.name}' has no label map to evaluate against")
        predicted = segmenter.segment(as_image(case.image), cancel=cancel)
        reference = sitk.Cast(as_image(case.label), sitk.sitkUInt8)
        if reference.GetSize() != predicted.GetSize():
            raise InputImageError(f"The label map of '{case.name}' does not have its image's size")
        reference.CopyInformation(predicted)
        dice = dice_per_label(sitk.GetArrayViewFromImage(predicted), sitk.GetArrayViewFromImage(reference),
                              list(names))
        row = {"case": case.name, **{names[v]: round(s, 4) for v, s in dice.items()}}
        row.update({f"{names[v]} HD95": round(hausdorff95(predicted, reference, v), 2) for v in names})
        rows.append(row)
        logger.info("%s %s", case.name, row)
    mean = {name: round(float(np.mean([row[name] for row in rows])), 4) for name in names.values()}
    mean["mean"] = round(float(np.mean(list(mean.values()))), 4)
    hd95 = {name: round(float(np.nanmean([row[f"{name} HD95"] for row in rows])), 2) for name in names.values()}
    return {"cases": rows, "dice_mean": mean, "hd95_mean_mm": hd95}
