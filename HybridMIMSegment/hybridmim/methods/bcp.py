"""BCP, bidirectional copy-paste: a box of an unlabelled patch is pasted into a labelled one and the reverse;
labelled voxels keep their reference labels, pasted unlabelled voxels get the teacher's labels at a lower weight."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import Method, StepBatch

if TYPE_CHECKING:
    import torch


def losses(network: torch.nn.Module, batch: StepBatch) -> dict[str, torch.Tensor]:
    from ..semisupervised import box_mask, copy_paste, weighted_dice_ce

    count = min(batch.images.shape[0], batch.unlabeled.shape[0])
    box = box_mask(tuple(batch.images.shape[2:]), batch.settings.paste_fraction, batch.generator)
    box = box.to(batch.images.device)
    named = {}
    for name, region in (("inward", box), ("outward", ~box)):
        mixed, mixed_labels, weights = copy_paste(batch.images[:count], batch.labels[:count], batch.weights[:count],
                                                  batch.unlabeled[:count], batch.teacher_labels[:count],
                                                  batch.confident[:count], region)
        named[name] = weighted_dice_ce(network(mixed), mixed_labels, weights)
    return named


METHOD: Method = Method("bcp", "BCP", "Bidirectional copy-paste: boxes are swapped between corrected and unlabelled "
                        "volumes; the averaged copy labels the pasted unlabelled voxels.", losses)
