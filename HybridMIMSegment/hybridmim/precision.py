"""Mixed precision where the hardware runs it natively: bf16 autocast on CUDA and on CPUs with bf16 units
(AVX512-BF16 or AMX); fp32 elsewhere, where bf16 would be emulated and slower.

Training only: on the CPU, inference stays fp32 (bf16 changed labels, Dice 0.998 against fp32 on the tiled sample:
docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import os
from contextlib import AbstractContextManager, nullcontext

import torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
#: Set to 0 to train in fp32 on a CPU that has bf16 units (to compare, or to rule precision out).
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


def training_precision(device: torch.device) -> str:
    """'bf16' or 'fp32': what ``training_autocast`` runs on ``device``."""
    if device.type == "cuda":
        return "bf16"
    if device.type == "cpu" and cpu_has_bf16() and os.environ.get(ENVIRONMENT_SWITCH, "1") != "0":
        return "bf16"
    return "fp32"


def training_autocast(device: torch.device) -> AbstractContextManager:
    if training_precision(device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
