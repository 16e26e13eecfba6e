"""The HybridMIM pretext model: a registry backbone (encoder + decoder) with the three pretext heads.

Backbones are adapted, not modified: an adapter exposes the encoder's skip features and bottleneck, decodes only
a region (all skip features cropped to it), and names the reconstruction head that is dropped on export.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from hybridmim.networks import build_network

from .masking import region_slices

GRID = 6  # patches per side of a crop (authors: 6 x 6 x 6 patches of 16^3 = a 96^3 crop)


class BasicUNetAdapter:
    """MONAI BasicUNet: 4 down-sampling steps; bottleneck at stride 16 (6^3 at 96^3)."""

    head = "final_conv"
    bottleneck_stride = 16

    def __init__(self, network: nn.Module) -> None:
        self.net = network

    def bottleneck_channels(self) -> int:
        return self.net.down_4.convs.conv_1.conv.out_channels

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        x0 = self.net.conv_0(x)
        x1 = self.net.down_1(x0)
        x2 = self.net.down_2(x1)
        x3 = self.net.down_3(x2)
        return [x0, x1, x2, x3, self.net.down_4(x3)]

    def decode_region(self, features: list[torch.Tensor], corner: tuple[int, int, int],
                      subvolume: int) -> torch.Tensor:
        x0, x1, x2, x3, x4 = (f[(..., *region_slices(corner, subvolume, 2**level))] for level, f in enumerate(features))
        u4 = self.net.upcat_4(x4, x3)
        u3 = self.net.upcat_3(u4, x2)
        u2 = self.net.upcat_2(u3, x1)
        return self.net.final_conv(self.net.upcat_1(u2, x0))


class SwinUNETRAdapter:
    """MONAI SwinUNETR: Swin encoder to stride 32 (3^3 tokens at 96^3) plus convolutional skip encoders."""

    head = "out"
    bottleneck_stride = 32

    def __init__(self, network: nn.Module) -> None:
        self.net = network

    def bottleneck_channels(self) -> int:
        return self.net.encoder10.layer.conv1.conv.out_channels

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        hidden = self.net.swinViT(x, self.net.normalize)
        return [self.net.encoder1(x), self.net.encoder2(hidden[0]), self.net.encoder3(hidden[1]),
                self.net.encoder4(hidden[2]), hidden[3], self.net.encoder10(hidden[4])]

    def decode_region(self, features: list[torch.Tensor], corner: tuple[int, int, int],
                      subvolume: int) -> torch.Tensor:
        enc0, enc1, enc2, enc3, hid3, dec4 = (f[(..., *region_slices(corner, subvolume, 2**level))]
                                              for level, f in enumerate(features))
        dec3 = self.net.decoder5(dec4, hid3)
        dec2 = self.net.decoder4(dec3, enc3)
        dec1 = self.net.decoder3(dec2, enc2)
        dec0 = self.net.decoder2(dec1, enc1)
        return self.net.out(self.net.decoder1(dec0, enc0))


ADAPTERS = {"basicunet": BasicUNetAdapter, "swinunetr": SwinUNETRAdapter}


@dataclass
class PretextOutput:
    reconstruction: torch.Tensor  # (B, 1, 4p, 4p, 4p): the decoded 2 x 2 x 2 sub-volume block (p: patch size)
    count_logits: torch.Tensor  # (B, 27, 9)
    location_logits: torch.Tensor  # (B, 27, 8)
    embedding: torch.Tensor  # (B, projection_dim)


class HybridMIMModel(nn.Module):
    """Backbone + count head + location head + projection head (the heads are dropped on export)."""

    def __init__(self, architecture: str, args: dict, patch_size: int = 16, projection_dim: int = 384) -> None:
        super().__init__()
        if architecture not in ADAPTERS:
            raise ValueError(f"HybridMIM pre-training supports {sorted(ADAPTERS)}, not '{architecture}'")
        self.architecture, self.args = architecture, dict(args)
        self.patch_size, self.subvolume = patch_size, 2 * patch_size
        self.crop_size = GRID * patch_size
        self.backbone = build_network(architecture, 1, 1, **args)  # 1 output channel: the reconstruction
        self.adapter = ADAPTERS[architecture](self.backbone)
        channels = self.adapter.bottleneck_channels()
        self.cells = self.subvolume // self.adapter.bottleneck_stride  # bottleneck cells per sub-volume side
        if self.cells < 1 or self.subvolume % self.adapter.bottleneck_stride:
            raise ValueError(f"patch size {patch_size} is too small for {architecture} (bottleneck stride "
                             f"{self.adapter.bottleneck_stride}); use a patch of at least "
                             f"{self.adapter.bottleneck_stride // 2}")
        self.count_head = nn.Linear(channels, 9)
        self.location_head = nn.Linear(channels, 8)
        self.projection = nn.Sequential(nn.Linear(channels, channels), nn.GELU(), nn.Linear(channels, projection_dim))

    def subvolume_features(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """(B, C, n, n, n) bottleneck -> (B, 27, C): average over each sub-volume's extent (Swin: one token each)."""
        pooled = nn.functional.avg_pool3d(bottleneck, self.cells) if self.cells > 1 else bottleneck
        return pooled.flatten(2).transpose(1, 2)

    def embed(self, masked: torch.Tensor) -> torch.Tensor:
        """Sample-level embedding of a masked crop (dropout active in training mode)."""
        return self.projection(self.adapter.encode(masked)[-1].mean((2, 3, 4)))

    def forward(self, masked: torch.Tensor, corner: tuple[int, int, int]) -> PretextOutput:
        features = self.adapter.encode(masked)
        bottleneck = features[-1]
        regions = self.subvolume_features(bottleneck)
        return PretextOutput(
            reconstruction=self.adapter.decode_region(features, corner, self.subvolume),
            count_logits=self.count_head(regions),
            location_logits=self.location_head(regions),
            embedding=self.projection(bottleneck.mean((2, 3, 4))),
        )

    def backbone_state_without_head(self) -> dict[str, torch.Tensor]:
        """Encoder and decoder weights for export; the reconstruction head is not a segmentation head."""
        return {k: v for k, v in self.backbone.state_dict().items() if not k.startswith(self.adapter.head + ".")}
