"""Overlap metrics on label arrays, shared by training, evaluation, fine-tuning and tests."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def dice_per_label(prediction: np.ndarray, reference: np.ndarray, labels: list[int]) -> dict[int, float]:
    """Dice for each label value; 1.0 when a label is absent from both (nothing to find, nothing found)."""
    scores = {}
    for value in labels:
        pred, ref = prediction == value, reference == value
        denominator = int(pred.sum()) + int(ref.sum())
        scores[value] = 1.0 if denominator == 0 else 2.0 * int(np.logical_and(pred, ref).sum()) / denominator
    return scores


def hausdorff95(prediction: sitk.Image, reference: sitk.Image, label: int) -> float:
    """95th-percentile symmetric surface distance in mm (MONAI's convention: the larger of the two directed 95th
    percentiles). NaN when the label is missing from either image."""
    distances = []
    for source, target in ((prediction, reference), (reference, prediction)):
        source_mask, target_mask = source == label, target == label
        if not sitk.GetArrayViewFromImage(source_mask).any() or not sitk.GetArrayViewFromImage(target_mask).any():
            return float("nan")
        to_target = sitk.Abs(sitk.SignedMaurerDistanceMap(target_mask, insideIsPositive=False, squaredDistance=False,
                                                          useImageSpacing=True))
        surface = sitk.GetArrayFromImage(sitk.LabelContour(source_mask)) > 0
        distances.append(float(np.percentile(sitk.GetArrayViewFromImage(to_target)[surface], 95)))
    return max(distances)
