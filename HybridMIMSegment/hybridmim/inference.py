"""Volume in, labelmap out: preprocessing per card, MONAI sliding-window inference, labelmap on the input grid."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import cast

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference

from .errors import HybridMIMError
from .geometry import ModelGrid, labels_on_grid, values_on_grid
from .imageio import check_output_path, read_volume, write_labelmap
from .model_card import ModelCard
from .model_store import LoadedModel, load_model
from .postprocessing import keep_largest_component
from .precision import autocast, inference_precision
from .preprocessing import checked_model_grid, model_input
from .progress import CancelToken, ProgressCallback, no_progress
from .uncertainty import normalised_entropy, uncertainty_score

logger = logging.getLogger(__name__)

DEFAULT_OVERLAP = 0.25
# How overlapping windows are blended: MONAI's default, uniform weights. With it our labels equal a plain MONAI
# pipeline's voxel for voxel wherever no resampling is needed (benchmark_inference.py); a card may ask for
# "gaussian" (``inference.blend``).
DEFAULT_BLEND = "constant"
# Windows per network call unless the card says otherwise (``inference.window_batch``). On CPU a batch of 4 runs a
# CNN window about 2.5x faster than batches of 1 (measured with Testing/Benchmarks/benchmark_inference.py); on a
# GPU it is halved on out-of-memory.
DEFAULT_WINDOW_BATCH = 4
GPU_OUTPUT_BYTES = 2 * 1024**3  # larger class-score maps are accumulated in CPU memory, window by window


def available_devices() -> list[str]:
    """The devices this PyTorch can run on, best first ('cpu' always)."""
    mps = getattr(torch.backends, "mps", None)
    return (["cuda"] if torch.cuda.is_available() else []) + \
        (["mps"] if mps is not None and mps.is_available() else []) + ["cpu"]


def select_device(requested: str = "auto") -> torch.device:
    """'auto' picks CUDA when available (Apple's mps only when asked for: not every 3D operation runs there);
    asking for a device PyTorch does not see is an error, not a silent fallback."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = requested.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise HybridMIMError(f"Unknown device '{requested}': use auto, cpu, cuda or mps")
    if kind not in available_devices():
        raise HybridMIMError(f"Device '{requested}' was requested but PyTorch sees none; use --device cpu or auto")
    return torch.device(requested)


def softmax_in_slabs(logits: torch.Tensor, slab: int = 16) -> torch.Tensor:
    """Softmax over classes of (1, C, X, Y, Z) logits, in place, a few slices at a time (no second full map)."""
    for start in range(0, logits.shape[-1], slab):
        logits[..., start:start + slab] = logits[..., start:start + slab].softmax(1)
    return logits


def window_count(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Number of windows MONAI's sliding window visits (volumes smaller than the window are padded)."""
    count = 1
    for size, window in zip(shape, roi):
        size = max(size, window)
        step = window if size == window else max(int(window * (1 - overlap)), 1)
        count *= math.ceil((size - window) / step) + 1
    return count


View = Callable[[torch.Tensor], torch.Tensor]


def tta_views(inference: dict) -> list[tuple[View, View]]:
    """The card's test-time augmentation as (view, back) pairs on (B, C, X, Y, Z) tensors: the plain pass, a flip
    along each ``tta_flip_axes`` axis (models trained with those flips), and 90, 180 and 270 degree rotations about
    ``tta_rot90_axis`` (models trained with any rotation about it, whose grid is isotropic across it)."""
    def plain(x: torch.Tensor) -> torch.Tensor:
        return x

    views: list[tuple[View, View]] = [(plain, plain)]
    for axis in inference.get("tta_flip_axes", []):
        flip = partial(torch.flip, dims=[int(axis) + 2])
        views.append((flip, flip))
    if "tta_rot90_axis" in inference:
        plane = [a + 2 for a in range(3) if a != int(inference["tta_rot90_axis"])]
        views += [(partial(torch.rot90, k=k, dims=plane), partial(torch.rot90, k=-k, dims=plane)) for k in (1, 2, 3)]
    return views


class Segmenter:
    """A loaded model ready to segment volumes; reuse it for many volumes to load weights once."""

    def __init__(self, model: LoadedModel | str | os.PathLike, device: str = "auto",
                 overlap: float | None = None, sw_batch_size: int | None = None,
                 precision: str | None = None) -> None:
        """``precision``: 'fp32', 'bf16' or 'fp16' autocast; by default what the device runs natively for this
        model (``hybridmim.precision``)."""
        self.device = select_device(device)
        self.requested_precision = precision
        self.model = model if isinstance(model, LoadedModel) else load_model(model, self.device)
        self.model.network.to(self.device).eval()
        self.overlap = overlap if overlap is not None else self.model.card.inference.get("overlap", DEFAULT_OVERLAP)
        self.sw_batch_size = sw_batch_size or self.card_window_batch
        self.blend = self.model.card.inference.get("blend", DEFAULT_BLEND)

    @property
    def precision(self) -> str:
        """What the windows run in on the Segmenter's device."""
        return self.precision_on(self.device)

    def precision_on(self, device: torch.device) -> str:
        return self.requested_precision or inference_precision(device, self.card.inference.get("cpu_bf16", False))

    @property
    def card(self) -> ModelCard:
        return self.model.card

    @property
    def card_window_batch(self) -> int:
        """Windows per network call for this architecture (measured per card; a SwinUNETR's attention makes
        large batches cost memory without saving time on the CPU)."""
        return int(self.card.inference.get("window_batch", DEFAULT_WINDOW_BATCH))

    def predict_probabilities(self, volume: torch.Tensor, progress: ProgressCallback = no_progress,
                              cancel: CancelToken | None = None, *, device: torch.device | None = None,
                              window_batch: int | None = None) -> torch.Tensor:
        """(C, X, Y, Z) normalised input on the model grid -> (classes, X, Y, Z) softmax probabilities on the CPU,
        averaged over the card's test-time views (``tta_views``). ``device`` and
        ``window_batch`` (default: the Segmenter's) are this call's; the network must be on that device."""
        device = device or self.device
        window_batch = window_batch or self.sw_batch_size
        roi = tuple(int(p) for p in self.card.patch_size)
        views = tta_views(self.card.inference)
        total = len(views) * math.ceil(window_count(volume.shape[1:], roi, self.overlap) / window_batch)
        done = 0

        def predictor(windows: torch.Tensor) -> torch.Tensor:
            nonlocal done
            if cancel is not None:
                cancel.raise_if_cancelled()
            output = self.model.network(windows)
            done += 1
            progress(min(done / total, 1.0), f"window batch {done}/{total}")
            return output

        on_gpu = device.type == "cuda"
        output_bytes = 4 * (self.card.out_channels + 1) * math.prod(volume.shape[1:])
        output_device = torch.device("cpu") if on_gpu and output_bytes > GPU_OUTPUT_BYTES else device
        probabilities: torch.Tensor | None = None
        with torch.inference_mode(), autocast(device, self.precision_on(device)):
            for view, back in views:
                view_roi = tuple(view(torch.empty(1, 1, *roi, device="meta")).shape[2:])  # a turned patch's sides
                logits = cast(torch.Tensor, sliding_window_inference(view(volume[None].to(device)), view_roi,
                                                                     window_batch, predictor, overlap=self.overlap,
                                                                     mode=self.blend, device=output_device))
                scores = back(softmax_in_slabs(logits.float()))
                probabilities = scores if probabilities is None else probabilities.add_(scores)
            assert probabilities is not None  # views always holds the plain pass
            if len(views) > 1:
                probabilities.div_(len(views))
        return probabilities[0].cpu()

    def _predict_with_fallback(self, volume: torch.Tensor, progress: ProgressCallback,
                               cancel: CancelToken | None) -> torch.Tensor:
        """On GPU out-of-memory, retry with half as many windows per call, and on the CPU once a single window
        does not fit; each step is logged and reported. The choice holds for this volume only: the Segmenter
        (and its network) is back on its own device and window batch for the next one."""
        device, window_batch = self.device, self.sw_batch_size
        try:
            while True:
                try:
                    return self.predict_probabilities(volume, progress, cancel, device=device,
                                                      window_batch=window_batch)
                except torch.cuda.OutOfMemoryError:
                    if device.type != "cuda":
                        raise
                    torch.cuda.empty_cache()
                    if window_batch > 1:
                        window_batch //= 2
                        message = f"GPU out of memory: retrying with {window_batch} window(s) per batch"
                    else:
                        device, window_batch = torch.device("cpu"), self.card_window_batch
                        self.model.network.to(device)
                        message = "GPU out of memory: continuing on the CPU for this volume"
                    logger.warning("%s (model %s)", message, self.card.id)
                    progress(0.0, message)
        finally:
            if device != self.device:
                self.model.network.to(self.device)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # a finished, failed or cancelled run gives its GPU memory back

    def segment(self, image: sitk.Image, progress: ProgressCallback = no_progress,
                cancel: CancelToken | None = None) -> sitk.Image:
        """Segment a volume; the returned uint8 labelmap has exactly the volume's geometry."""
        return self._segment(image, progress, cancel)[0]

    def segment_and_score(self, image: sitk.Image, progress: ProgressCallback = no_progress,
                          cancel: CancelToken | None = None) -> tuple[sitk.Image, float]:
        """``segment``, and how unsure the model was (``uncertainty_score``, 0-1): to rank volumes for correction."""
        labelmap, probabilities, _ = self._segment(image, progress, cancel)
        return labelmap, uncertainty_score(probabilities)

    def segment_with_uncertainty(self, image: sitk.Image, progress: ProgressCallback = no_progress,
                                 cancel: CancelToken | None = None) -> tuple[sitk.Image, float, sitk.Image]:
        """``segment_and_score``, and the uncertainty voxel by voxel (normalised entropy, 0-1, float32) on the
        volume's exact geometry: a map to overlay on the volume."""
        labelmap, probabilities, grid = self._segment(image, progress, cancel)
        return (labelmap, uncertainty_score(probabilities),
                values_on_grid(normalised_entropy(probabilities), grid, image))

    def _segment(self, image: sitk.Image, progress: ProgressCallback,
                 cancel: CancelToken | None) -> tuple[sitk.Image, torch.Tensor, ModelGrid]:
        """The labelmap on the input's geometry, the class probabilities on the model grid, and that grid."""
        card = self.card
        grid = checked_model_grid(image, card)
        progress(0.0, "preprocessing")
        tensor = torch.from_numpy(model_input(image, grid, card.intensity))
        windows_progress = lambda f, m: progress(0.05 + 0.85 * f, m)  # noqa: E731
        probabilities = self._predict_with_fallback(tensor, windows_progress, cancel)
        if cancel is not None:
            cancel.raise_if_cancelled()
        progress(0.95, "postprocessing")
        labelmap = keep_largest_component(labels_on_grid(probabilities, grid, image),
                                          card.inference.get("largest_component", []))
        progress(1.0, "done")
        return labelmap, probabilities, grid


def segment_file(input_path: str | os.PathLike, output_path: str | os.PathLike, model: str | os.PathLike,
                 device: str = "auto", progress: ProgressCallback = no_progress,
                 cancel: CancelToken | None = None) -> Path:
    """Read, segment and write. Inputs and the output name are checked before any work; nothing is written on
    error or cancellation."""
    output_path = check_output_path(output_path, input_path)
    image = read_volume(input_path)
    segmenter = Segmenter(model, device)
    labelmap = segmenter.segment(image, progress, cancel)
    logger.info("Labels found: %s", np.unique(sitk.GetArrayViewFromImage(labelmap)).tolist())
    return write_labelmap(labelmap, output_path, segmenter.card.labels)
