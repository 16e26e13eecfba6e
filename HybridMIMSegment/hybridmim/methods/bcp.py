"""BCP, bidirectional copy-paste (Bai et al., CVPR 2023): a box of one patch is pasted into another and the reverse.
The supervised phase pastes between labelled patches; then a box of an unlabelled patch goes into a labelled one and
the reverse: labelled voxels keep their reference labels (weight 1), pasted unlabelled voxels get the EMA teacher's
labels (their loss weighs 0.5; the recipe takes every voxel's argmax, one-piece structures reduced to their largest
piece)."""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING

from . import LabelledBatch, Method, StepBatch

if TYPE_CHECKING:
    import torch


def losses(network: torch.nn.Module, batch: StepBatch) -> dict[str, torch.Tensor]:
    """Both pastes, each a loss over its labelled voxels plus ``PSEUDO_WEIGHT`` times a loss over its pasted
    unlabelled voxels, normalised apart as BCP does (one voxel-weighted loss would let the larger region rule)."""
    from ..semisupervised import PSEUDO_WEIGHT, box_mask, copy_paste, weighted_dice_ce

    count = min(batch.images.shape[0], batch.unlabeled.shape[0])
    box = box_mask(tuple(batch.images.shape[2:]), batch.settings.paste_fraction, batch.generator)
    box = box.to(batch.images.device)
    named = {}
    for name, region in (("inward", box), ("outward", ~box)):
        mixed, mixed_labels, labelled, pasted = copy_paste(
            batch.images[:count], batch.labels[:count], batch.weights[:count], batch.unlabeled[:count],
            batch.teacher_labels[:count], batch.confident[:count], region)
        logits = network(mixed)
        named[name] = weighted_dice_ce(logits, mixed_labels, labelled) \
            + PSEUDO_WEIGHT * weighted_dice_ce(logits, mixed_labels, pasted)
    return named


def warmup(network: torch.nn.Module, batch: LabelledBatch) -> dict[str, torch.Tensor]:
    """Labelled copy-paste: each patch gets a box of another (two patches: both directions; one patch: itself, so
    plain supervised), labels and weights alike, so the network sees pasted edges before it sees them between
    labelled and unlabelled voxels."""
    import torch

    from ..semisupervised import box_mask, mix, weighted_dice_ce

    images, labels, weights = batch.images, batch.labels, batch.weights
    box = box_mask(tuple(images.shape[2:]), batch.settings.paste_fraction, batch.generator).to(images.device)
    other = torch.roll(torch.arange(images.shape[0]), 1)
    mixed = weighted_dice_ce(network(mix(images[other], images, box)), mix(labels[other], labels, box),
                             mix(weights[other], weights, box))
    return {"supervised": mixed}


METHOD: Method = Method("bcp", "BCP", "Bidirectional copy-paste: boxes are swapped between corrected and unlabelled "
                        "volumes; the averaged copy labels the pasted unlabelled voxels.", losses, warmup,
                        recipe=MappingProxyType({"confidence": 0.0, "single_piece_pseudo_labels": True}))
