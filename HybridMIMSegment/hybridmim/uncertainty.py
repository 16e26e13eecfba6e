"""How unsure a model is about a volume: one number per volume, to pick the volume worth correcting next.

The score is the mean normalised entropy of the class probabilities (0: certain, 1: all classes equally likely)
over the voxels where the model gives some structure at least ``REGION_PROBABILITY``: where its answer matters.
Background far from any structure is certain in every volume and would only dilute the score by the volume's size.
"""

from __future__ import annotations

import math

import torch

REGION_PROBABILITY = 0.1


def uncertainty_score(probabilities: torch.Tensor) -> float:
    """``probabilities``: (C, X, Y, Z) softmax output, channel 0 background. 0.0 where no voxel reaches the
    region (the model sees nothing anywhere)."""
    classes = probabilities.shape[0]
    region = probabilities[0] <= 1 - REGION_PROBABILITY
    if classes < 2 or not bool(region.any()):
        return 0.0
    inside = probabilities[:, region].float().clamp_min(1e-12)
    entropy = -(inside * inside.log()).sum(0) / math.log(classes)
    return float(entropy.mean())
