"""The HybridMIM pretext model: a registry backbone (encoder + decoder) with the three pretext heads.

Backbones are used, not modified: the network registry's ``parts`` (``hybridmim.networks.NetworkParts``) give the
encoder's skip features and bottleneck and run the decoder on features cropped to one region; the output layer
(the reconstruction head) is dropped on export.

The sample-level embedding is the 27 sub-volume features flattened, through a projection head with batch norm:
the mean of the bottleneck (the authors' choice) is nearly the same vector for every crop, so the contrastive term
could not learn from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from hybridmim.networks import build_network, network_parts, output_layer_names

from .masking import region_slices

GRID = 6  # patches per side of a crop (authors: 6 x 6 x 6 patches of 16^3 = a 96^3 crop)


@dataclass
class PretextOutput:
    reconstruction: torch.Tensor  # (B, 1, 4p, 4p, 4p): the decoded 2 x 2 x 2 sub-volume block (p: patch size)
    count_logits: torch.Tensor  # (B, 27, 9)
    location_logits: torch.Tensor  # (B, 27, 8)
    embedding: torch.Tensor  # (B, projection_dim)


class HybridMIMModel(nn.Module):
    """Backbone + count head + location head + projection head (the heads are dropped on export)."""

    def __init__(self, architecture: str, args: dict, mask_patch: int = 16, projection_dim: int = 384,
                 projection_hidden: int = 512) -> None:
        super().__init__()
        self.architecture, self.args = architecture, dict(args)
        self.mask_patch, self.subvolume = mask_patch, 2 * mask_patch
        self.crop_size = GRID * mask_patch
        self.backbone = build_network(architecture, 1, 1, **args)  # 1 output channel: the reconstruction
        self.parts = network_parts(architecture, self.backbone)
        channels = self.parts.bottleneck_channels()
        self.cells = self.subvolume // self.parts.bottleneck_stride  # bottleneck cells per sub-volume side
        if self.cells < 1 or self.subvolume % self.parts.bottleneck_stride:
            raise ValueError(f"masking patch {mask_patch} is too small for {architecture} (bottleneck stride "
                             f"{self.parts.bottleneck_stride}); use a patch of at least "
                             f"{self.parts.bottleneck_stride // 2}")
        self.count_head = nn.Linear(channels, 9)
        self.location_head = nn.Linear(channels, 8)
        regions = (GRID // 2) ** 3
        self.projection = nn.Sequential(nn.Linear(regions * channels, projection_hidden),
                                        nn.BatchNorm1d(projection_hidden), nn.ReLU(inplace=True),
                                        nn.Linear(projection_hidden, projection_dim))

    def subvolume_features(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """(B, C, n, n, n) bottleneck -> (B, 27, C): average over each sub-volume's extent (Swin: one token each)."""
        pooled = nn.functional.avg_pool3d(bottleneck, self.cells) if self.cells > 1 else bottleneck
        return pooled.flatten(2).transpose(1, 2)

    def embed(self, masked: torch.Tensor) -> torch.Tensor:
        """Sample-level embedding of a masked crop (dropout active in training mode); computes only the encoder's
        path to the bottleneck."""
        return self.project(self.subvolume_features(self.parts.encode_bottleneck(masked)))

    def project(self, regions: torch.Tensor) -> torch.Tensor:
        """(B, 27, C) sub-volume features -> (B, projection_dim) embedding."""
        return self.projection(regions.flatten(1))

    def forward(self, masked: torch.Tensor, corner: tuple[int, int, int]) -> PretextOutput:
        features = self.parts.encode(masked)
        bottleneck = features[-1]
        regions = self.subvolume_features(bottleneck)
        return PretextOutput(
            reconstruction=self.decode_region(features, corner),
            count_logits=self.count_head(regions),
            location_logits=self.location_head(regions),
            embedding=self.project(regions),
        )

    def decode_region(self, features: list[torch.Tensor], corner: tuple[int, int, int]) -> torch.Tensor:
        """The decoder on the 2 x 2 x 2 sub-volume block at ``corner`` only: every feature cropped to it."""
        strides = self.parts.feature_strides()
        return self.parts.decode([f[(..., *region_slices(corner, self.subvolume, stride))]
                                  for f, stride in zip(features, strides)])

    def backbone_state_without_head(self) -> dict[str, torch.Tensor]:
        """Encoder and decoder weights for export: the output layer (what depends on the number of output
        channels) reconstructs intensities, it is not a segmentation head."""
        head = output_layer_names(self.architecture, 1, 1, **self.args)
        return {k: v for k, v in self.backbone.state_dict().items() if k not in head}
