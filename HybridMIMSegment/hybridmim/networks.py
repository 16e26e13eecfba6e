"""Network registry: one name per architecture, built from a model card's ``architecture`` entry.

Both backbone families sit behind the same call, ``build_network(name, in_channels, out_channels, **args)``,
so the engine, the CLI and the training package never special-case an architecture. A network that HybridMIM
pre-training can use is registered with its ``parts``: how to run its encoder and its decoder separately.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
import torch.nn as nn

from .errors import ModelCardError

NetworkBuilder = Callable[..., nn.Module]

_REGISTRY: dict[str, NetworkBuilder] = {}
_PARTS: dict[str, type[NetworkParts]] = {}


class NetworkParts:
    """A built network run as encoder and decoder separately. ``encode`` gives the features the decoder uses,
    feature ``i`` at stride ``feature_strides()[i]`` (the last is the bottleneck); ``decode`` takes them, possibly
    all cropped to one region, and returns the output layer's result for that region. ``fixed_stride``: the
    bottleneck's stride when the architecture fixes it (patch sides must be multiples of it), None when its
    arguments choose it."""

    fixed_stride: int | None = None

    def __init__(self, network: nn.Module) -> None:
        self.net: Any = network

    def feature_strides(self) -> list[int]:
        raise NotImplementedError

    @property
    def bottleneck_stride(self) -> int:
        return self.feature_strides()[-1]

    def bottleneck_channels(self) -> int:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def encode_bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The bottleneck alone (networks whose skip features are not on the way to it override this)."""
        return self.encode(x)[-1]

    def decode(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


def register_network(name: str, parts: type[NetworkParts] | None = None) -> Callable[[NetworkBuilder], NetworkBuilder]:
    """Decorator adding a builder ``(in_channels, out_channels, **args) -> nn.Module`` under ``name``, with its
    encoder/decoder ``parts`` when it has them."""

    def add(builder: NetworkBuilder) -> NetworkBuilder:
        _REGISTRY[name] = builder
        if parts is not None:
            _PARTS[name] = parts
        return builder

    return add


def network_parts(name: str, network: nn.Module) -> NetworkParts:
    """``network`` (built as ``name``) as encoder and decoder, or an error naming the networks that have parts."""
    if name not in _PARTS:
        raise ModelCardError(f"Network '{name}' cannot be run as encoder and decoder (HybridMIM pre-training); "
                             f"these can: {', '.join(sorted(_PARTS))}")
    return _PARTS[name](network)


def fixed_pooling(name: str) -> int | None:
    """The stride of the bottleneck of a network that pools every axis alike (patch sides must be multiples of
    it), for the networks registered with parts; None for the others."""
    return _PARTS[name].fixed_stride if name in _PARTS else None


def network_names() -> list[str]:
    return sorted(_REGISTRY)



def build_network(name: str, in_channels: int, out_channels: int, **args: Any) -> nn.Module:
    _check_known(name)
    try:
        return _REGISTRY[name](in_channels, out_channels, **args)
    except TypeError as error:
        raise ModelCardError(f"Invalid arguments for network '{name}': {error}") from error


def _check_known(name: str) -> None:
    if name not in _REGISTRY:
        raise ModelCardError(f"Unknown network '{name}'; known networks: {', '.join(network_names())}")


class UNetParts(NetworkParts):
    """MONAI UNet: nested (down, skip(submodule), up) blocks around a stride-1 bottom layer; every level's down
    layer pools by its stride (the first one too), and the skip concatenates a level's input to the decoder.
    Pre-training needs the same stride on every axis."""

    def __init__(self, network: nn.Module) -> None:
        from monai.networks.layers import SkipConnection

        super().__init__(network)
        self.levels: list[tuple[nn.Module, nn.Module]] = []  # (down, up), outermost first
        block: Any = self.net.model
        while isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], SkipConnection):
            self.levels.append((block[0], block[2]))
            block = block[1].submodule
        self.bottom: nn.Module = block
        given: list[Any] = list(self.net.strides)
        if any(not isinstance(s, int) and len(set(s)) > 1 for s in given):
            raise ModelCardError(f"A UNet with strides {given} pools the axes differently; "
                                 "HybridMIM pre-training needs the same stride on every axis")
        strides = [s if isinstance(s, int) else int(s[0]) for s in given]
        self.strides = [int(math.prod(strides[: i + 1])) for i in range(len(self.levels))]

    def feature_strides(self) -> list[int]:
        return [*self.strides, self.strides[-1]]  # the bottom layer keeps the last level's stride

    def bottleneck_channels(self) -> int:
        return int(self.net.channels[-1])

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for down, _ in self.levels:
            x = down(x)
            features.append(x)
        return [*features, self.bottom(x)]

    def decode(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for (_, up), skip in zip(reversed(self.levels), reversed(features[:-1])):
            x = up(torch.cat([skip, x], dim=1))
        return x


@register_network("unet", parts=UNetParts)
def _unet(in_channels: int, out_channels: int, **args: Any) -> nn.Module:
    from monai.networks.nets import UNet

    args.setdefault("spatial_dims", 3)
    return UNet(in_channels=in_channels, out_channels=out_channels, **args)


class BasicUNetParts(NetworkParts):
    """MONAI BasicUNet: 4 down-sampling steps; bottleneck at stride 16 (6^3 at 96^3)."""

    fixed_stride = 16

    def feature_strides(self) -> list[int]:
        return [1, 2, 4, 8, 16]

    def bottleneck_channels(self) -> int:
        return int(self.net.down_4.convs.conv_1.conv.out_channels)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        x0 = self.net.conv_0(x)
        x1 = self.net.down_1(x0)
        x2 = self.net.down_2(x1)
        x3 = self.net.down_3(x2)
        return [x0, x1, x2, x3, self.net.down_4(x3)]

    def decode(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x0, x1, x2, x3, x4 = features
        u4 = self.net.upcat_4(x4, x3)
        u3 = self.net.upcat_3(u4, x2)
        u2 = self.net.upcat_2(u3, x1)
        return self.net.final_conv(self.net.upcat_1(u2, x0))


@register_network("basicunet", parts=BasicUNetParts)
def _basicunet(in_channels: int, out_channels: int, **args: Any) -> nn.Module:
    from monai.networks.nets import BasicUNet

    args.setdefault("spatial_dims", 3)
    return BasicUNet(in_channels=in_channels, out_channels=out_channels, **args)


@register_network("segresnet")
def _segresnet(in_channels: int, out_channels: int, **args: Any) -> nn.Module:
    from monai.networks.nets import SegResNet

    args.setdefault("spatial_dims", 3)
    return SegResNet(in_channels=in_channels, out_channels=out_channels, **args)


class SwinUNETRParts(NetworkParts):
    """MONAI SwinUNETR: Swin encoder to stride 32 (3^3 tokens at 96^3) plus convolutional skip encoders."""

    fixed_stride = 32

    def feature_strides(self) -> list[int]:
        return [1, 2, 4, 8, 16, 32]

    def bottleneck_channels(self) -> int:
        return int(self.net.encoder10.layer.conv1.conv.out_channels)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        hidden = self.net.swinViT(x, self.net.normalize)
        return [self.net.encoder1(x), self.net.encoder2(hidden[0]), self.net.encoder3(hidden[1]),
                self.net.encoder4(hidden[2]), hidden[3], self.net.encoder10(hidden[4])]

    def encode_bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.encoder10(self.net.swinViT(x, self.net.normalize)[4])

    def decode(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        enc0, enc1, enc2, enc3, hid3, dec4 = features
        dec3 = self.net.decoder5(dec4, hid3)
        dec2 = self.net.decoder4(dec3, enc3)
        dec1 = self.net.decoder3(dec2, enc2)
        dec0 = self.net.decoder2(dec1, enc1)
        return self.net.out(self.net.decoder1(dec0, enc0))


@register_network("swinunetr", parts=SwinUNETRParts)
def _swinunetr(in_channels: int, out_channels: int, **args: Any) -> nn.Module:
    try:
        import einops  # noqa: F401  (MONAI's SwinUNETR needs it but does not install it)
    except ImportError as error:
        raise ModelCardError(
            "SwinUNETR models need the 'einops' package: pip install einops"
        ) from error
    from monai.networks.nets import SwinUNETR

    args.setdefault("spatial_dims", 3)
    if "use_flash_attention" in inspect.signature(SwinUNETR).parameters:  # MONAI >= 1.5
        args.setdefault("use_flash_attention", True)
    return keep_window_masks(SwinUNETR(in_channels=in_channels, out_channels=out_channels, **args))


@contextlib.contextmanager
def monai_default_attention(network: nn.Module) -> Iterator[nn.Module]:
    """The network as a plain MONAI pipeline runs it, for comparisons: unfused attention, shifted-window masks
    rebuilt in every pass."""
    fuse_attention(network, False)
    keep_window_masks(network, False)
    try:
        yield network
    finally:
        fuse_attention(network)
        keep_window_masks(network)


def keep_window_masks(network: nn.Module, enabled: bool = True) -> nn.Module:
    """Let this network's shifted-window stages keep their attention masks instead of rebuilding them in every
    stage of every pass (about 12 % of a SwinUNETR-12 window of 64^3 on the CPU). A mask depends only on the padded
    size, window, shift and device, and MONAI never changes it in place; the masks of one patch size take about
    80 MB. Each stage runs MONAI's own ``BasicLayer.forward`` code with ``compute_mask`` looked up in a namespace
    of this network's, which holds the cached one: MONAI's module and every other network are left as they are."""
    from monai.networks.nets import swin_unetr

    layers = [module for module in network.modules() if isinstance(module, swin_unetr.BasicLayer)]
    if not enabled:
        for layer in layers:
            layer.__dict__.pop("forward", None)
        return network

    @functools.lru_cache(maxsize=8)
    def cached(dims: tuple, window_size: tuple, shift_size: tuple, device: Any) -> Any:
        return swin_unetr.compute_mask(list(dims), window_size, shift_size, device)

    def compute_mask(dims: Sequence[int], window_size: Sequence[int], shift_size: Sequence[int], device: Any) -> Any:
        return cached(tuple(dims), tuple(window_size), tuple(shift_size), device)

    plain = swin_unetr.BasicLayer.forward
    forward = types.FunctionType(plain.__code__, {**vars(swin_unetr), "compute_mask": compute_mask}, plain.__name__,
                                 plain.__defaults__, plain.__closure__)
    forward.cache_info = cached.cache_info  # type: ignore[attr-defined]
    for layer in layers:
        layer.forward = types.MethodType(forward, layer)  # type: ignore[method-assign]  # per instance, by design
    return network


def kept_window_masks(network: nn.Module) -> Any:
    """The cache statistics (``functools`` CacheInfo) of the network's kept window masks; None when not kept."""
    forward = next((m.__dict__.get("forward") for m in network.modules() if "forward" in m.__dict__), None)
    return forward.__func__.cache_info() if forward is not None else None


def fuse_attention(network: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch fused scaled-dot-product attention in the passes without gradients (inference, teachers) of every
    attention block that offers it (MONAI >= 1.5's windowed attention, built with it on; older MONAI: no change),
    for comparisons with MONAI's default. Measured on a
    SwinUNETR-12 window of 64^3, one CPU thread: 1.06 s instead of 1.97 s, outputs within 4e-6, same labels.
    Training passes are unchanged: MONAI takes the fused path only without gradients."""
    for module in network.modules():
        if hasattr(module, "use_flash_attention"):
            cast(Any, module).use_flash_attention = enabled  # a plain attribute, not a Module or Tensor
    return network


def output_layer_names(name: str, in_channels: int, out_channels: int, **args: Any) -> frozenset[str]:
    """Names of the parameters and buffers whose shape depends on the number of output classes: the part to
    re-make when a model learns a new label set (found by building the network with one more class)."""
    one = build_network(name, in_channels, out_channels, **args).state_dict()
    other = build_network(name, in_channels, out_channels + 1, **args).state_dict()
    return frozenset(key for key in one if one[key].shape != other[key].shape)
