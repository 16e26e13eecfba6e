"""Pieces of semi-supervised fine-tuning, as plain tensor functions: the EMA teacher, confidence-masked
pseudo-labels, the targets of partly corrected volumes, CutMix / copy-paste mixing and a voxel-weighted Dice +
cross-entropy loss.

Every target carries a per-voxel weight: voxels the user reviewed keep their reference label with weight 1,
whatever the teacher predicts; pseudo-labelled voxels get ``PSEUDO_WEIGHT``, and none where the teacher is not
confident.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import EllipsisType

import torch
import torch.nn.functional as F

from .partial import UNREVIEWED
from .postprocessing import keep_largest_pieces

PSEUDO_WEIGHT = 0.5  # weight of a confident pseudo-label, relative to a reviewed voxel


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, parameters and floating-point buffers alike."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s.detach(), alpha=1 - decay)
    for t_buffer, s_buffer in zip(teacher.buffers(), student.buffers()):
        if t_buffer.is_floating_point():
            t_buffer.mul_(decay).add_(s_buffer.detach(), alpha=1 - decay)
        else:
            t_buffer.copy_(s_buffer)


@torch.no_grad()
def pseudo_labels(logits: torch.Tensor, threshold: float,
                  single_piece: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, X, Y, Z) teacher logits -> (B, 1, X, Y, Z) argmax labels and a 0/1 float mask of voxels whose top
    softmax probability reaches ``threshold``. Labels in ``single_piece`` keep only their largest piece in each
    patch, the rest becomes background (BCP's rule: the teacher's stray islands are its likeliest mistakes)."""
    confidence, labels = logits.float().softmax(1).max(1, keepdim=True)
    if single_piece:
        array = labels.cpu().numpy()  # shares memory with labels on the CPU: edited in place
        for patch in array[:, 0]:
            keep_largest_pieces(patch, single_piece)
        labels = torch.from_numpy(array).to(logits.device)
    return labels, (confidence >= threshold).float()


def reviewed_targets(labels: torch.Tensor, teacher_labels: torch.Tensor | None = None,
                     confident: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and per-voxel weights of labelled patches: reviewed voxels weigh 1; ``UNREVIEWED`` ones (partly
    corrected volumes) take the teacher's label with ``PSEUDO_WEIGHT`` where it is confident, and otherwise (or
    without a teacher) weigh 0."""
    reviewed = labels != UNREVIEWED
    if teacher_labels is None or confident is None:
        return labels.masked_fill(~reviewed, 0), reviewed.float()
    return torch.where(reviewed, labels, teacher_labels), torch.where(reviewed, 1.0, PSEUDO_WEIGHT * confident)


def box_mask(shape: tuple[int, ...], fraction: float, generator: torch.Generator) -> torch.Tensor:
    """A (1, 1, X, Y, Z) bool mask, True inside one randomly placed box whose sides are ``fraction`` of the patch."""
    mask = torch.zeros((1, 1, *shape), dtype=torch.bool)
    box: list[slice] = []
    for extent in shape:
        side = max(1, round(extent * fraction))
        start = int(torch.randint(0, extent - side + 1, (1,), generator=generator))
        box.append(slice(start, start + side))
    index: tuple[EllipsisType | slice, ...] = (..., *box)
    mask[index] = True
    return mask


def mix(inside: torch.Tensor, outside: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``inside`` where ``mask`` is True, ``outside`` elsewhere (mask broadcasts over batch and channels)."""
    return torch.where(mask, inside, outside)


def copy_paste(images: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, unlabeled: torch.Tensor,
               teacher_labels: torch.Tensor, confident: torch.Tensor,
               region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """BCP mixing: unlabelled voxels inside ``region``, labelled (user-corrected) voxels elsewhere. Returns the
    mixed image, its labels (the labelled patches' targets, the teacher's where pasted) and the weights of the two
    losses BCP keeps apart: the labelled voxels' own ``weights`` (0 where pasted) and the pasted voxels'
    ``confident`` mask (0 elsewhere)."""
    zero = torch.zeros_like(weights)
    return (mix(unlabeled, images, region), mix(teacher_labels, labels, region), mix(zero, weights, region),
            mix(confident, zero, region))


def weighted_dice_ce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the weighted voxels plus soft Dice (foreground classes) over them.

    ``logits`` (B, C, ...), ``labels`` (B, 1, ...) int64, ``weights`` (B, 1, ...) >= 0. Zero total weight -> 0
    (with a gradient path, so callers need no special case).
    """
    logits = logits.float()
    total = weights.sum()
    if total <= 0:
        return logits.sum() * 0.0
    cross_entropy = (F.cross_entropy(logits, labels[:, 0], reduction="none")[:, None] * weights).sum() / total
    probabilities = logits.softmax(1)
    one_hot = torch.zeros_like(probabilities).scatter_(1, labels, 1.0)
    dims = (0, *range(2, logits.ndim))
    intersection = (probabilities * one_hot * weights).sum(dims)[1:]
    denominator = ((probabilities + one_hot) * weights).sum(dims)[1:]
    dice = 1 - (2 * intersection + 1e-5) / (denominator + 1e-5)
    return cross_entropy + dice.mean()


def sigmoid_rampup(fraction: float) -> float:
    """exp(-5 (1 - f)^2): the usual ramp of the unsupervised weight from ~0 to 1 over ``fraction`` in [0, 1]."""
    fraction = min(max(fraction, 0.0), 1.0)
    return float(torch.exp(torch.tensor(-5.0 * (1 - fraction) ** 2)))
