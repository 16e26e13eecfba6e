"""Inference benchmark (not a test): our pipeline vs a plain MONAI reference pipeline, same network and weights,
same process, same inputs. Prints wall time, peak resident memory above the run's start, and their ratios.

The reference is what a MONAI user writes by hand: LoadImaged -> EnsureChannelFirstd -> Orientationd (the
model's LPS axis order) -> Spacingd(card spacing) -> NormalizeIntensityd -> sliding_window_inference (defaults:
sw_batch_size 1, overlap 0.25, constant blending) -> argmax -> Invertd back to the input grid.

    pip install -e ".[benchmark]"   # nibabel and pynrrd for MONAI's LoadImage
    python Testing/Benchmarks/benchmark_inference.py [--model ID] [--device cpu|cuda] [--large-ct] [VOLUME ...]

By default it runs the shipped hippocampus sample, that sample tiled 4 x 4 x 4 (a 140 x 192 x 128 MRI on which the
bundled model sees real anatomy in 100+ windows, so label agreement means something) and the chest CT.
``--large-ct`` adds a 512 x 512 x 600 CT made by resampling the chest CT to 0.4 mm slices. Generated volumes are
written to a temporary folder. On a GPU it also prints the network's achieved TFLOP/s (FLOPs of every window it
runs, over the pipeline's wall time) against the card's dense fp16 peak.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from hybridmim.cli import image_label_pair
from hybridmim.geometry import model_grid
from hybridmim.imageio import read_volume
from hybridmim.inference import Segmenter, tta_views, window_count
from hybridmim.metrics import dice_per_label
from hybridmim.model_card import ModelCard
from hybridmim.networks import monai_default_attention
from hybridmim.preprocessing import HU_WINDOW

REPO = Path(__file__).resolve().parents[2]
DEFAULT_VOLUMES = [REPO / "Resources" / "Samples" / "hippocampus_017.nii.gz",
                   REPO.parent / "shared" / "data" / "unlabeled" / "ct" / "chest_ct_pyradiomics_lung1.nrrd"]


class PeakMemory:
    """Peak resident set size (bytes) above the level at entry, sampled every 2 ms from /proc."""

    def __enter__(self) -> PeakMemory:
        gc.collect()
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back so runs start level
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as stream:
            return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.used = self.peak - self.start
        self.gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def reference_pipeline(path: Path, segmenter: Segmenter) -> np.ndarray:
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        Orientationd,
        Spacingd,
    )

    card = segmenter.card
    pre = Compose([LoadImaged("image"), EnsureChannelFirstd("image"),
                   Orientationd("image", "LPS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
                   Spacingd("image", card.target_spacing, mode="bilinear"), reference_intensity(card)])
    data = pre({"image": str(path)})
    with monai_default_attention(segmenter.model.network) as network, torch.no_grad():
        logits = sliding_window_inference(data["image"][None].to(segmenter.device), card.patch_size, 1, network)
    data["pred"] = logits[0].argmax(0, keepdim=True).cpu()
    data = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True)(data)
    return np.asarray(data["pred"][0]).astype(np.uint8).transpose(2, 1, 0)  # to SimpleITK's (k, j, i)


def reference_intensity(card: ModelCard):
    """The MONAI transform a user would pick for the card's normalisation (``auto``: by the card's modality)."""
    from monai.transforms import NormalizeIntensityd, ScaleIntensityRanged, ScaleIntensityRangePercentilesd

    method = card.intensity.method
    if method == "auto":
        method = "ct_window" if card.modality.upper() == "CT" else "percentile"
    if method == "zscore":
        return NormalizeIntensityd("image")
    if method == "ct_window":
        low, high = card.intensity.window or HU_WINDOW
        return ScaleIntensityRanged("image", low, high, 0.0, 1.0, clip=True)
    low, high = card.intensity.percentiles or (0.5, 99.5)
    return ScaleIntensityRangePercentilesd("image", low, high, 0.0, 1.0, clip=True)


def make_large_ct(folder: Path) -> Path:
    """512 x 512 x 600 CT: the chest CT's 48 slices of 5 mm resampled to 600 slices of 0.4 mm."""
    chest = sitk.ReadImage(str(DEFAULT_VOLUMES[1]))
    spacing = [*chest.GetSpacing()[:2], chest.GetSize()[2] * chest.GetSpacing()[2] / 600]
    grid = sitk.Image([512, 512, 600], chest.GetPixelID())
    grid.SetSpacing(spacing)
    grid.SetOrigin(chest.GetOrigin())
    grid.SetDirection(chest.GetDirection())
    path = folder / "large_ct_512x512x600.nrrd"
    sitk.WriteImage(sitk.Resample(chest, grid, sitk.Transform(), sitk.sitkLinear, -1000), str(path), True)
    return path


def make_tiled_mri(folder: Path) -> Path:
    """The shipped hippocampus sample tiled 4 x 4 x 4 at its own 1 mm spacing (no resampling)."""
    sample = sitk.ReadImage(str(DEFAULT_VOLUMES[0]))
    tiled = sitk.Tile([sample] * 64, [4, 4, 4])
    tiled.SetSpacing(sample.GetSpacing())
    tiled.SetOrigin(sample.GetOrigin())
    tiled.SetDirection(sample.GetDirection())
    path = folder / "hippocampus_tiled_4x4x4.nii.gz"
    sitk.WriteImage(tiled, str(path))
    return path


GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}  # dense fp16


def network_tflop(path: Path, segmenter: Segmenter) -> float:
    """FLOPs (in units of 10^12) of every window our pipeline runs on this volume."""
    from torch.utils.flop_counter import FlopCounterMode

    card = segmenter.card
    grid = model_grid(read_volume(path), card.target_spacing)
    windows = window_count(grid.model_shape, card.patch_size, segmenter.overlap)
    windows *= len(tta_views(card.inference))
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        segmenter.model.network(torch.zeros(1, card.in_channels, *card.patch_size, device=segmenter.device))
    return counter.get_total_flops() * windows / 1e12


def ours(path: Path, segmenter: Segmenter) -> np.ndarray:
    return sitk.GetArrayFromImage(segmenter.segment(read_volume(path)))


def _image_and_label(spec: str) -> tuple[Path, Path | None]:
    """``IMAGE`` or ``IMAGE:LABEL``, parsed as the ``hybridmim`` command line parses its pairs."""
    try:
        image, label = image_label_pair(spec)
    except argparse.ArgumentTypeError:  # no label given
        return Path(spec), None
    return Path(image), Path(label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("volumes", nargs="*", metavar="IMAGE[:LABEL]",
                        help="volumes to run (default: see above); with :LABEL, a ground-truth label map, both "
                             "pipelines' Dice against it is printed too")
    parser.add_argument("--model", default="hippocampus-cnn")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--large-ct", action="store_true", help="also run a 512 x 512 x 600 CT built from the chest CT")
    parser.add_argument("--window-batch", type=int, help="windows per network call in our pipeline (default: the "
                                                         "card's inference.window_batch, else the engine's default)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="hybridmim-benchmark-"))
    truths = dict(_image_and_label(spec) for spec in args.volumes)
    args.volumes = list(truths) or [DEFAULT_VOLUMES[0], make_tiled_mri(folder), DEFAULT_VOLUMES[1]]
    if args.large_ct:
        args.volumes.append(make_large_ct(folder))
    segmenter = Segmenter(args.model, args.device, sw_batch_size=args.window_batch)
    gpu = torch.cuda.get_device_name(segmenter.device) if segmenter.device.type == "cuda" else ""
    print(f"model {segmenter.card.id}, device {gpu or 'cpu'}, torch threads {torch.get_num_threads()}, "
          f"{segmenter.sw_batch_size} windows per batch")
    ours(args.volumes[0], segmenter)  # warm-up of both paths
    reference_pipeline(args.volumes[0], segmenter)
    on_gpu = segmenter.device.type == "cuda"
    header = f"{'volume':40s} {'voxels':>11s} {'pipeline':>9s} {'time s':>8s} {'peak MB':>8s}"
    print(header + (f" {'GPU MB':>8s}" if on_gpu else "") + "   agreement")
    for path in args.volumes:
        results = {}
        for name, run in (("reference", reference_pipeline), ("ours", ours)):
            with PeakMemory() as memory:
                start = time.perf_counter()
                labels = run(path, segmenter)
                if on_gpu:
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
            gpu_mb = f" {memory.gpu / 2**20:8.0f}" if on_gpu else ""
            results[name] = (labels, seconds, memory.used / 2**20, gpu_mb)
        (ref, ref_s, ref_mb, ref_gpu), (mine, my_s, my_mb, my_gpu) = results["reference"], results["ours"]
        if ref.shape != mine.shape:
            agreement = "shapes differ"
        elif np.array_equal(ref, mine):
            agreement = "identical labels"
        else:
            dice = dice_per_label(mine, ref, list(segmenter.card.label_names()))
            agreement = (f"Dice vs reference {np.mean(list(dice.values())):.4f} "
                         f"({np.count_nonzero(ref != mine)} voxels differ)")
        size = "x".join(map(str, mine.shape[::-1]))
        print(f"{path.name:40s} {size:>11s} {'reference':>9s} {ref_s:8.2f} {ref_mb:8.0f}{ref_gpu}")
        print(f"{'':40s} {'':>11s} {'ours':>9s} {my_s:8.2f} {my_mb:8.0f}{my_gpu}   {agreement}")
        print(f"{'':40s} {'':>11s} {'ratio':>9s} {ref_s / my_s:7.2f}x {ref_mb / max(my_mb, 1):7.2f}x"
              "   (reference / ours: >1 means ours is faster / smaller)")
        if truths.get(path):
            truth = sitk.GetArrayFromImage(sitk.ReadImage(str(truths[path])))
            names = list(segmenter.card.label_names())
            ref_dice, my_dice = (np.mean(list(dice_per_label(labels, truth, names).values())) for labels in (ref, mine))
            print(f"{'':40s} {'':>11s} {'truth':>9s} Dice vs ground truth: "
                  f"reference {ref_dice:.4f}, ours {my_dice:.4f}")
        if on_gpu:
            achieved = network_tflop(path, segmenter) / my_s
            peak = next((tflops for name, tflops in GPU_PEAK_TFLOPS.items() if name in gpu), None)
            share = f", {100 * achieved / peak:.1f} % of the card's {peak:.0f} TFLOP/s fp16 peak" if peak else ""
            print(f"{'':40s} {'':>11s} {'ours':>9s} network {achieved:.2f} TFLOP/s achieved{share}")


if __name__ == "__main__":
    main()
