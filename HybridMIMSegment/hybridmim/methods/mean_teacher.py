"""Mean Teacher: the EMA teacher labels unlabelled patches; the student learns its confident voxels on a strong view
(CutMix between unlabelled patches plus noise), with a weight ramped up after the supervised phase."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import Method, StepBatch
from .supervised import supervised_loss

if TYPE_CHECKING:
    import torch


def losses(network: torch.nn.Module, batch: StepBatch) -> dict[str, torch.Tensor]:
    import torch

    from ..semisupervised import box_mask, mix, sigmoid_rampup, weighted_dice_ce

    settings, unlabeled = batch.settings, batch.unlabeled
    permutation = torch.roll(torch.arange(unlabeled.shape[0]), 1)
    box = box_mask(tuple(unlabeled.shape[2:]), settings.paste_fraction, batch.generator).to(unlabeled.device)
    strong = mix(unlabeled[permutation], unlabeled, box)
    strong = strong + 0.1 * torch.randn(strong.shape, generator=batch.generator).to(strong.device)
    mixed_labels = mix(batch.teacher_labels[permutation], batch.teacher_labels, box)
    mixed_weights = mix(batch.confident[permutation], batch.confident, box)
    ramp = sigmoid_rampup((batch.fraction - settings.supervised_fraction)
                          / max(1e-6, 1 - settings.supervised_fraction))
    return {
        "supervised": supervised_loss(network, batch.images, batch.labels, batch.weights),
        "unlabeled": settings.unlabeled_weight * ramp * weighted_dice_ce(network(strong), mixed_labels, mixed_weights),
    }


METHOD: Method = Method("mean-teacher", "Mean Teacher",
                        "Also learns from the unlabelled volumes: a slowly averaged copy of the network labels them "
                        "and the network learns its confident voxels on perturbed views.", losses)
