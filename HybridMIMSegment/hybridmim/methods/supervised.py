"""Supervised: learns from the corrected volumes only. Its loss is also the labelled term of every other method."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import Method

if TYPE_CHECKING:
    import torch


def supervised_loss(network: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:
    """Dice + cross-entropy on labelled patches, each voxel with its weight (1 where reviewed)."""
    from ..semisupervised import weighted_dice_ce

    return weighted_dice_ce(network(images), labels, weights)


METHOD: Method = Method("supervised", "Supervised",
                        "Learns from the corrected segmentations only. Needs no unlabelled volumes.")
