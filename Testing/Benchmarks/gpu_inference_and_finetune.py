"""GPU check, part of ``gpu_check.sh`` (not a test): the engine's inference on a GPU in its default precision (fp16
autocast) and in fp32, against the CPU in fp32, on the shipped sample tiled 4 x 4 x 4 (140 x 192 x 128 voxels at
1 mm); then one fine-tuning round with the engine's default method and budget, timed. Prints times, ratios, label
agreement and the fine-tune's steps per second.

    python Testing/Benchmarks/gpu_inference_and_finetune.py [--model la-cnn] [--device cuda] [--steps N]

``--steps`` caps the fine-tune (the dry run on a CPU uses a few); without it the round runs the default budget.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_inference import DEFAULT_VOLUMES, make_tiled_mri  # noqa: E402

from hybridmim.finetune import fine_tune  # noqa: E402
from hybridmim.imageio import read_volume  # noqa: E402
from hybridmim.inference import Segmenter  # noqa: E402
from hybridmim.metrics import dice_per_label  # noqa: E402
from hybridmim.settings import (  # noqa: E402
    DEFAULT_MINUTES,
    DEFAULT_STEPS,
    TrainSettings,  # noqa: E402
)
from hybridmim.trainer import TrainProgress  # noqa: E402

SAMPLE_LABEL = DEFAULT_VOLUMES[0].with_name("hippocampus_017.label.nii.gz")


def timed_segment(segmenter: Segmenter, image: sitk.Image, repeats: int = 3) -> tuple[float, np.ndarray]:
    """Best of ``repeats`` runs after one warm-up (the first CUDA call compiles and allocates)."""
    labels = sitk.GetArrayFromImage(segmenter.segment(image))
    best = float("inf")
    for _ in range(repeats):
        if segmenter.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        segmenter.segment(image)
        if segmenter.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="la-cnn")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, help="cap the fine-tuning round at N steps (dry run)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="hybridmim-gpu-check-"))
    os.environ["HYBRIDMIM_USER_MODELS"] = str(folder / "models")  # the fine-tuned model goes there, not to ~
    image = read_volume(make_tiled_mri(folder))
    runs = {"cpu fp32": Segmenter(args.model, "cpu", precision="fp32")}
    if args.device != "cpu":
        runs[f"{args.device} fp32"] = Segmenter(args.model, args.device, precision="fp32")
        default = Segmenter(args.model, args.device)
        runs[f"{args.device} {default.precision} (default)"] = default
    print(f"inference: model {args.model}, volume {'x'.join(map(str, image.GetSize()))}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    reference_seconds, reference = None, None
    for name, segmenter in runs.items():
        seconds, labels = timed_segment(segmenter, image)
        if reference is None:
            reference_seconds, reference = seconds, labels
        names = list(segmenter.card.label_names())
        agreement = min(dice_per_label(labels, reference, names).values()) if labels.any() else float("nan")
        print(f"  {name:24s} {seconds:7.3f} s  {reference_seconds / seconds:6.1f}x vs cpu fp32  "
              f"label Dice vs cpu fp32 {agreement:.4f}")

    settings = TrainSettings(steps=args.steps or DEFAULT_STEPS, minutes=None if args.steps else DEFAULT_MINUTES)
    steps_done = []
    start = time.perf_counter()
    output = fine_tune(args.model, [(DEFAULT_VOLUMES[0], SAMPLE_LABEL)], settings=settings,
                       label_names=["anterior hippocampus", "posterior hippocampus"],
                       model_id="gpu-check", device=args.device,
                       progress=lambda p: steps_done.append(p.step) if isinstance(p, TrainProgress) else None)
    seconds = time.perf_counter() - start
    steps = max(steps_done, default=0)
    print(f"fine-tune round ({settings.method}, budget {settings.steps} steps / {settings.minutes} min): "
          f"{steps} steps in {seconds:.1f} s including evaluation and saving ({steps / seconds:.1f} steps/s); "
          f"written to {output}")


if __name__ == "__main__":
    main()
