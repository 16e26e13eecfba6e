"""Overlap metrics on label arrays, shared by training, evaluation, fine-tuning and tests."""

from __future__ import annotations

import numpy as np


def dice_per_label(prediction: np.ndarray, reference: np.ndarray, labels: list[int]) -> dict[int, float]:
    """Dice for each label value; 1.0 when a label is absent from both (nothing to find, nothing found)."""
    scores = {}
    for value in labels:
        pred, ref = prediction == value, reference == value
        denominator = int(pred.sum()) + int(ref.sum())
        scores[value] = 1.0 if denominator == 0 else 2.0 * int(np.logical_and(pred, ref).sum()) / denominator
    return scores
