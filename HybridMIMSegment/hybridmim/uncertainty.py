"""How unsure a model is about a volume: one number per volume, to pick the volume worth correcting next.

The score is the mean normalised entropy of the class probabilities (0: certain, 1: all classes equally likely)
over the voxels where the model gives some structure at least ``REGION_PROBABILITY``: where its answer matters.
Background far from any structure is certain in every volume and would only dilute the score by the volume's size.
The same entropy voxel by voxel is the uncertainty map a user can overlay (``Segmenter.segment_with_uncertainty``).
"""

from __future__ import annotations

import math

import torch

REGION_PROBABILITY = 0.1


def normalised_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """(C, ...) probabilities -> (...) entropy over the classes divided by its maximum, log C (0 .. 1)."""
    classes = probabilities.shape[0]
    if classes < 2:
        return torch.zeros(probabilities.shape[1:])
    p = probabilities.float().clamp_min(1e-12)
    return -(p * p.log()).sum(0) / math.log(classes)


def uncertainty_score(probabilities: torch.Tensor) -> float:
    """``probabilities``: (C, X, Y, Z) softmax output, channel 0 background. 0.0 where no voxel reaches the
    region (the model sees nothing anywhere)."""
    region = probabilities[0] <= 1 - REGION_PROBABILITY
    if probabilities.shape[0] < 2 or not bool(region.any()):
        return 0.0
    return float(normalised_entropy(probabilities[:, region]).mean())
