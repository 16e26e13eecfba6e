"""The two-level masking hierarchy of HybridMIM, kept as explicit tensors (never inferred from voxel values).

A crop of ``grid * patch`` voxels per side is a grid of patches (level 2; authors: 6 x 6 x 6 patches of 16^3 in a
96^3 crop). Every 2 x 2 x 2 block of patches is a sub-volume (level 1; 3 x 3 x 3 of 32^3). Per sub-volume the
targets are how many of its 8 patches are masked and which ones, built by reshaping the patch mask, so they match
the mask geometrically.

Crops carry a validity mask (1 = inside the volume, 0 = padding). Patches with no valid voxel are never masked and
carry no target; masked voxels are filled with a value outside the data's [0, 1] range, so the network can tell
them from padding and from dark tissue.
"""

from __future__ import annotations

import torch

PATCHES_PER_SUBVOLUME = 2  # per side
MASK_FILL = -1.0  # masked voxels; the data lie in [0, 1] and padding is 0


def random_patch_mask(batch: int, grid: int, ratio: float, generator: torch.Generator | None = None,
                      allowed: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, grid, grid, grid) bool: exactly round(ratio * n) of a sample's n ``allowed`` patches (default: all)
    masked, chosen uniformly among them."""
    allowed = torch.ones(batch, grid, grid, grid, dtype=torch.bool) if allowed is None else allowed.bool().cpu()
    allowed = allowed.reshape(batch, grid**3)
    scores = torch.rand(batch, grid**3, generator=generator).masked_fill(~allowed, 2.0)  # not allowed: last
    rank = scores.argsort(1).argsort(1)
    counts = (ratio * allowed.sum(1).double()).round().long()
    return (rank < counts[:, None]).reshape(batch, grid, grid, grid)


def patch_validity(valid: torch.Tensor, mask_patch: int) -> torch.Tensor:
    """(B, 1, g*p, g*p, g*p) voxel validity -> (B, g, g, g) bool: the patch holds at least one voxel of the volume."""
    return torch.nn.functional.max_pool3d(valid.float(), mask_patch)[:, 0] > 0


def voxel_mask(patch_mask: torch.Tensor, mask_patch: int) -> torch.Tensor:
    """(B, g, g, g) patch mask -> (B, 1, g*p, g*p, g*p) float voxel mask (1 = masked)."""
    mask = patch_mask.float()
    for dim in (1, 2, 3):
        mask = mask.repeat_interleave(mask_patch, dim)
    return mask[:, None]


def apply_mask(images: torch.Tensor, mask: torch.Tensor, fill: float = MASK_FILL) -> torch.Tensor:
    """Replace masked voxels by ``fill`` (authors: 0, the value of padding and of background)."""
    return images * (1 - mask) + fill * mask


def subvolume_bits(patches: torch.Tensor) -> torch.Tensor:
    """(B, g, g, g) per-patch values -> (B, S^3, 8): sub-volume (a, b, c) is index a*S*S + b*S + c; its bit
    (p, q, r) is index p*4 + q*2 + r and refers to patch (2a+p, 2b+q, 2c+r). The authors' code instead took
    patches 8i..8i+7 in raster order (not a sub-volume)."""
    batch, grid = patches.shape[0], patches.shape[1]
    s, p = grid // PATCHES_PER_SUBVOLUME, PATCHES_PER_SUBVOLUME
    return patches.reshape(batch, s, p, s, p, s, p).permute(0, 1, 3, 5, 2, 4, 6).reshape(batch, s**3, p**3)


def subvolume_targets(patch_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-volume: masked-patch count (B, S^3) in 0..8 and masked bits (B, S^3, 8) (``subvolume_bits``)."""
    bits = subvolume_bits(patch_mask)
    return bits.sum(-1).long(), bits.float()


def region_slices(corner: tuple[int, int, int], subvolume_size: int, stride: int = 1) -> tuple[slice, ...]:
    """Spatial slices of the 2 x 2 x 2 sub-volume block whose first sub-volume is ``corner`` (each 0 or 1), at a
    feature level of the given stride."""
    size = 2 * subvolume_size // stride
    return tuple(slice(c * subvolume_size // stride, c * subvolume_size // stride + size) for c in corner)


def random_corner(generator: torch.Generator | None = None) -> tuple[int, int, int]:
    """Corner of the decoded block: one of the 8 positions of a 2 x 2 x 2 block in the 3 x 3 x 3 sub-volumes."""
    return tuple(int(v) for v in torch.randint(0, 2, (3,), generator=generator))
