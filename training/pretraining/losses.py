"""HybridMIM losses: pixel level (masked reconstruction of the decoded region), region level (masked-patch count
and location with a consistency term that has gradients on both sides) and sample level (NT-Xent with the other
samples of the global batch as negatives). Region-level terms take weights that leave padding out: a bit per
patch (0 for a patch of padding only) and the count per sub-volume (0 for a sub-volume of padding only)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def masked_reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over masked voxels only (all tensors cropped to the decoded region)."""
    squared = (reconstruction.float() - target.float()) ** 2 * mask
    return squared.sum() / mask.sum().clamp(min=1.0)


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return values.mean()
    weights = weights.to(values)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def count_loss(count_logits: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B, S, 9) logits vs (B, S) masked-patch counts; ``weights`` (B, S)."""
    values = F.cross_entropy(count_logits.flatten(0, 1).float(), counts.flatten(), reduction="none")
    return _weighted_mean(values, None if weights is None else weights.flatten())


def location_loss(location_logits: torch.Tensor, bits: torch.Tensor, weights: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """(B, S, 8) logits vs (B, S, 8) masked bits; ``weights`` (B, S, 8)."""
    return _weighted_mean(F.binary_cross_entropy_with_logits(location_logits.float(), bits, reduction="none"),
                          weights)


def consistency_loss(count_logits: torch.Tensor, location_logits: torch.Tensor, weights: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """The count implied by the count head and by the location head (over the bits ``weights`` (B, S, 8) keep)
    should agree; both sides get gradients."""
    classes = torch.arange(count_logits.shape[-1], device=count_logits.device, dtype=torch.float32)
    from_count = (count_logits.float().softmax(-1) * classes).sum(-1)
    probabilities = location_logits.float().sigmoid()
    from_location = (probabilities if weights is None else probabilities * weights.to(probabilities)).sum(-1)
    kept = None if weights is None else (weights.sum(-1) > 0)
    return _weighted_mean((from_count - from_location) ** 2, kept)


def gather_with_gradient(features: torch.Tensor) -> torch.Tensor:
    """Concatenate ``features`` from all ranks; this rank's slice keeps its gradient."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    gathered = [torch.zeros_like(features) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, features.detach())
    gathered[dist.get_rank()] = features
    return torch.cat(gathered)


def nt_xent_loss(anchors: torch.Tensor, positives: torch.Tensor, temperature: float = 0.5,
                 gather: bool = True) -> torch.Tensor:
    """NT-Xent over the global batch: anchor i's positive is positive i, every other anchor and positive of every
    rank is a negative (``gather=False``: this rank's batch only, for work done on one rank such as validation).
    Non-zero for one sample per GPU as soon as there are several GPUs or samples. Under DDP the value is scaled by
    the number of ranks: the gradient reaching a rank's crops flows through its loss alone, and DDP then averages
    over the ranks."""
    scale = 1.0
    if gather:
        anchors, positives = gather_with_gradient(anchors), gather_with_gradient(positives)
        if dist.is_available() and dist.is_initialized():
            scale = float(dist.get_world_size())  # DDP averages gradients; each rank's reach only its own crops
    anchors = F.normalize(anchors.float(), dim=1)
    positives = F.normalize(positives.float(), dim=1)
    count = anchors.shape[0]
    features = torch.cat([anchors, positives])
    similarity = features @ features.t() / temperature
    similarity.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(count, 2 * count), torch.arange(count)]).to(similarity.device)
    return scale * F.cross_entropy(similarity, targets)
