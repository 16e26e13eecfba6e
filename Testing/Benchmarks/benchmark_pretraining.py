"""Pre-training cost benchmark (not a test): HybridMIM (decoder restricted to a 2x2x2 sub-volume block, plus the
region- and sample-level heads) vs a SimMIM-style full-crop reconstruction baseline (same backbone, same crop, same
mask, MSE on all masked voxels), in one process. Prints steps/s, peak memory and the ratio, per backbone.

    python Testing/Benchmarks/benchmark_pretraining.py [--device cpu|cuda] [--steps N] [--batch B]
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_inference import PeakMemory  # noqa: E402

from hybridmim_training.config import PretrainSettings  # noqa: E402
from hybridmim_training.pretraining.losses import masked_reconstruction_loss  # noqa: E402
from hybridmim_training.pretraining.masking import (  # noqa: E402
    apply_mask,
    random_corner,
    random_patch_mask,
    region_slices,
    voxel_mask,
)
from hybridmim_training.pretraining.pretext import GRID, HybridMIMModel  # noqa: E402
from hybridmim_training.pretraining.pretrain import pretext_losses  # noqa: E402

DEFAULTS = PretrainSettings()
BACKBONES = {
    "cnn (BasicUNet 32..512)": ("basicunet", {"features": [32, 32, 64, 128, 256, 32], "dropout": 0.1}),
    "swin (SwinUNETR-24)": ("swinunetr", {"feature_size": 24, "dropout_path_rate": 0.1}),
}


def hybridmim_step(module, optimizer, crops, device, generator) -> None:
    losses = pretext_losses(module, module, crops, torch.ones_like(crops), DEFAULTS, generator, device,
                            gather=False)
    optimizer.zero_grad(set_to_none=True)
    losses["total"].backward()
    optimizer.step()


def full_reconstruction_step(module, optimizer, crops, device, generator) -> None:
    mask = voxel_mask(random_patch_mask(crops.shape[0], GRID, DEFAULTS.mask_ratio, generator),
                      module.mask_patch).to(device)
    crops = crops.to(device)
    loss = masked_reconstruction_loss(module.backbone(apply_mask(crops, mask)), crops, mask)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def partial_reconstruction_step(module, optimizer, crops, device, generator) -> None:
    """The pixel-level task alone (decoder restricted to the block): isolates what partial prediction saves."""
    mask = voxel_mask(random_patch_mask(crops.shape[0], GRID, DEFAULTS.mask_ratio, generator),
                      module.mask_patch).to(device)
    crops = crops.to(device)
    corner = random_corner(generator)
    features = module.parts.encode(apply_mask(crops, mask))
    region = (..., *region_slices(corner, module.subvolume))
    loss = masked_reconstruction_loss(module.decode_region(features, corner),
                                      crops[region], mask[region])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def measure(step, module, device, steps: int, batch: int) -> tuple[float, float]:
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    crops = torch.rand(batch, 1, module.crop_size, module.crop_size, module.crop_size)
    generator = torch.Generator().manual_seed(0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    with autocast:
        step(module, optimizer, crops, device, generator)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    with PeakMemory() as memory:
        start = time.perf_counter()
        with autocast:
            for _ in range(steps):
                step(module, optimizer, crops, device, generator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    used = memory.gpu if device.type == "cuda" else memory.used
    return steps / seconds, used / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--backbones", nargs="*", default=list(BACKBONES))
    args = parser.parse_args()
    device = torch.device(args.device)
    memory_kind = "GPU peak MB" if device.type == "cuda" else "RSS peak MB"
    print(f"device {device}, batch {args.batch} crops of 96^3, {args.steps} timed steps, torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'backbone':26s} {'method':24s} {'steps/s':>8s} {memory_kind:>12s}")
    for name in args.backbones:
        architecture, backbone_args = BACKBONES[name]
        results = {}
        methods = (("HybridMIM (all 3 levels)", hybridmim_step),
                   ("partial reconstruction", partial_reconstruction_step),
                   ("full reconstruction", full_reconstruction_step))
        for method, step in methods:
            torch.manual_seed(0)
            module = HybridMIMModel(architecture, backbone_args).to(device).train()
            results[method] = measure(step, module, device, args.steps, args.batch)
            print(f"{name:26s} {method:24s} {results[method][0]:8.3f} {results[method][1]:12.0f}")
            del module
        full, full_mb = results["full reconstruction"]
        for method, label in (("HybridMIM (all 3 levels)", "ratio HybridMIM / full"),
                              ("partial reconstruction", "ratio partial / full")):
            speed, megabytes = results[method]
            print(f"{name:26s} {label:24s} {speed / full:7.2f}x {megabytes / max(full_mb, 1):11.2f}x")


if __name__ == "__main__":
    main()
