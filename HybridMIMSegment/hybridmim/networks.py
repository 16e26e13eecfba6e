"""Network registry: one name per architecture family, built from a model card's ``architecture`` entry.

Both backbone families sit behind the same call, ``build_network(name, in_channels, out_channels, **args)``,
so the engine, the CLI and the training package never special-case an architecture.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch.nn as nn

from .errors import ModelCardError

NetworkBuilder = Callable[..., nn.Module]

_REGISTRY: dict[str, tuple[str, NetworkBuilder]] = {}


def register_network(name: str, family: str) -> Callable[[NetworkBuilder], NetworkBuilder]:
    """Decorator adding a builder ``(in_channels, out_channels, **args) -> nn.Module`` under ``name``."""

    def add(builder: NetworkBuilder) -> NetworkBuilder:
        _REGISTRY[name] = (family, builder)
        return builder

    return add


def network_names() -> list[str]:
    return sorted(_REGISTRY)


def network_family(name: str) -> str:
    """'cnn' or 'transformer'."""
    _check_known(name)
    return _REGISTRY[name][0]


def build_network(name: str, in_channels: int, out_channels: int, **args: Any) -> nn.Module:
    _check_known(name)
    try:
        return _REGISTRY[name][1](in_channels, out_channels, **args)
    except TypeError as error:
        raise ModelCardError(f"Invalid arguments for network '{name}': {error}") from error


def _check_known(name: str) -> None:
    if name not in _REGISTRY:
        raise ModelCardError(f"Unknown network '{name}'; known networks: {', '.join(network_names())}")


@register_network("unet", family="cnn")
def _unet(in_channels: int, out_channels: int, **args: Any) -> nn.Module:
    from monai.networks.nets import UNet

    args.setdefault("spatial_dims", 3)
    return UNet(in_channels=in_channels, out_channels=out_channels, **args)


@register_network("basicunet", family="cnn")
def _basicunet(in_channels: int, out_channels: int, **args: Any) -> nn.Module:
    from monai.networks.nets import BasicUNet

    args.setdefault("spatial_dims", 3)
    return BasicUNet(in_channels=in_channels, out_channels=out_channels, **args)


@register_network("segresnet", family="cnn")
def _segresnet(in_channels: int, out_channels: int, **args: Any) -> nn.Module:
    from monai.networks.nets import SegResNet

    args.setdefault("spatial_dims", 3)
    return SegResNet(in_channels=in_channels, out_channels=out_channels, **args)


@register_network("swinunetr", family="transformer")
def _swinunetr(in_channels: int, out_channels: int, **args: Any) -> nn.Module:
    try:
        import einops  # noqa: F401  (MONAI's SwinUNETR needs it but does not install it)
    except ImportError as error:
        raise ModelCardError(
            "SwinUNETR models need the 'einops' package: pip install einops"
        ) from error
    from monai.networks.nets import SwinUNETR, swin_unetr

    if not hasattr(swin_unetr.compute_mask, "cache_info"):
        swin_unetr.compute_mask = _cached_window_mask(swin_unetr.compute_mask)
    args.setdefault("spatial_dims", 3)
    return fuse_attention(SwinUNETR(in_channels=in_channels, out_channels=out_channels, **args))


@contextlib.contextmanager
def monai_default_attention(network: nn.Module) -> Iterator[nn.Module]:
    """The network as a plain MONAI pipeline runs it, for comparisons: unfused attention, shifted-window masks
    rebuilt in every pass."""
    from monai.networks.nets import swin_unetr

    kept = swin_unetr.compute_mask
    swin_unetr.compute_mask = getattr(kept, "__wrapped__", kept)
    fuse_attention(network, False)
    try:
        yield network
    finally:
        fuse_attention(network)
        swin_unetr.compute_mask = kept


def _cached_window_mask(compute_mask: Callable[..., Any]) -> Callable[..., Any]:
    """MONAI's shifted-window attention mask, kept instead of rebuilt in every stage of every forward pass: it
    depends only on the padded size, window, shift and device, and MONAI never changes it in place. The rebuild was
    about 12 % of a SwinUNETR-12 window of 64^3 on the CPU; the masks kept for one patch size take about 80 MB."""

    @functools.lru_cache(maxsize=8)
    def cached(dims: tuple, window_size: tuple, shift_size: tuple, device: Any) -> Any:
        return compute_mask(list(dims), window_size, shift_size, device)

    def window_mask(dims: Sequence[int], window_size: Sequence[int], shift_size: Sequence[int], device: Any) -> Any:
        return cached(tuple(dims), tuple(window_size), tuple(shift_size), device)

    window_mask.cache_info, window_mask.__wrapped__ = cached.cache_info, compute_mask
    return window_mask


def fuse_attention(network: nn.Module, enabled: bool = True) -> nn.Module:
    """Use fused scaled-dot-product attention in the passes without gradients (inference, teachers) of every
    attention block that offers it (MONAI >= 1.5's windowed attention; older MONAI: no change). Measured on a
    SwinUNETR-12 window of 64^3, one CPU thread: 1.06 s instead of 1.97 s, outputs within 4e-6, same labels.
    Training passes are unchanged: MONAI takes the fused path only without gradients."""
    for module in network.modules():
        if hasattr(module, "use_flash_attention"):
            module.use_flash_attention = enabled
    return network


def output_layer_names(name: str, in_channels: int, out_channels: int, **args: Any) -> frozenset[str]:
    """Names of the parameters and buffers whose shape depends on the number of output classes: the part to
    re-make when a model learns a new label set (found by building the network with one more class)."""
    one = build_network(name, in_channels, out_channels, **args).state_dict()
    other = build_network(name, in_channels, out_channels + 1, **args).state_dict()
    return frozenset(key for key in one if one[key].shape != other[key].shape)
