"""Network registry: one name per architecture family, built from a model card's ``architecture`` entry.

Both backbone families sit behind the same call, ``build_network(name, in_channels, out_channels, **args)``,
so the engine, the CLI and the training package never special-case an architecture.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

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
