"""Mixed precision where the hardware runs it natively: bf16 autocast for training on CUDA and on CPUs with bf16
units (AVX512-BF16 or AMX); fp16 for inference on CUDA, bf16 on such CPUs for the models whose card says their
labels were measured to agree with fp32 (``inference.cpu_bf16``); fp32 elsewhere, where bf16 would be emulated and
slower. Agreement per bundled model: Testing/Benchmarks/benchmark_precision.py, docs/benchmarks.md.
"""

from __future__ import annotations

import functools
import os
from contextlib import AbstractContextManager, nullcontext

import torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
#: Set to 0 to run in fp32 on a CPU that has bf16 units (to compare, or to rule precision out).
ENVIRONMENT_SWITCH = "HYBRIDMIM_CPU_BF16"


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (Linux: /proc/cpuinfo flags; elsewhere PyTorch's own probe)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            flags = {word for line in info if line.startswith("flags") for word in line.split()}
        return any(flag in flags for flag in BF16_CPU_FLAGS)
    except OSError:
        probe = getattr(torch._C, "_cpu", None)
        return bool(probe and (getattr(probe, "_is_avx512_bf16_supported", lambda: False)()
                               or getattr(probe, "_is_amx_tile_supported", lambda: False)()))


AUTOCAST_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_uses_bf16() -> bool:
    return cpu_has_bf16() and os.environ.get(ENVIRONMENT_SWITCH, "1") != "0"


def training_precision(device: torch.device) -> str:
    """'bf16' or 'fp32': what ``training_autocast`` runs on ``device``."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_uses_bf16()):
        return "bf16"
    return "fp32"


def inference_precision(device: torch.device, cpu_bf16: bool) -> str:
    """'fp16' (CUDA), 'bf16' (a CPU with bf16 units, for a model whose labels agree with fp32: ``cpu_bf16``) or
    'fp32': what inference autocasts to."""
    if device.type == "cuda":
        return "fp16"
    return "bf16" if cpu_bf16 and device.type == "cpu" and cpu_uses_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """Autocast to ``precision`` ('bf16', 'fp16'; anything else runs fp32) on ``device``."""
    if precision in AUTOCAST_TYPES:
        return torch.autocast(device.type, dtype=AUTOCAST_TYPES[precision])
    return nullcontext()


def training_autocast(device: torch.device) -> AbstractContextManager:
    return autocast(device, training_precision(device))
