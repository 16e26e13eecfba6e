"""Inference precision benchmark (not a test): a bundled model on the held-out validation cases named in its card,
segmented with the engine in fp32 and in bf16 autocast (what CPUs with AVX512-BF16 or AMX run by default), one
after the other on each case, in one process. Prints per case the time of each, the Dice between their labels
and each one's Dice against the ground truth; then the median time ratio and the worst agreement.

    python Testing/Benchmarks/benchmark_precision.py --model la-cnn --dataset ../shared/data/la/dataset.json \
        [--threads N] [--limit N] [--channels-last]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import SimpleITK as sitk
import torch

from hybridmim.imageio import read_volume
from hybridmim.inference import Segmenter
from hybridmim.metrics import dice_per_label
from hybridmim.model_card import ModelCard
from hybridmim.model_store import resolve_model
from hybridmim.precision import cpu_has_bf16
from hybridmim_training.datalist import read_datalist

PRECISIONS = ("fp32", "bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="la-cnn", help="bundled model id or folder")
    parser.add_argument("--dataset", required=True, help="the dataset.json holding the card's validation cases")
    parser.add_argument("--threads", type=int, help="torch threads (default: PyTorch's)")
    parser.add_argument("--limit", type=int, help="only the first N validation cases")
    parser.add_argument("--channels-last", action="store_true", help="bf16 with the network in channels-last-3d")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    card = ModelCard.load(resolve_model(args.model))
    wanted = set(card.metrics.get("validation_cases", []))
    cases = [case for case in read_datalist(args.dataset) if case.name in wanted][:args.limit]
    if not cases:
        raise SystemExit(f"none of {card.id}'s validation cases are in {args.dataset}")
    segmenters = {precision: Segmenter(args.model, "cpu", precision=precision) for precision in PRECISIONS}
    if args.channels_last:
        segmenters["bf16"].model.network.to(memory_format=torch.channels_last_3d)
    names = list(card.label_names())
    print(f"model {card.id} {card.version}, {len(cases)} validation cases, torch threads {torch.get_num_threads()}, "
          f"CPU bf16 units: {cpu_has_bf16()}, channels-last: {args.channels_last}")
    for segmenter in segmenters.values():  # warm-up
        segmenter.segment(read_volume(cases[0].image))
    print(f"{'case':34s} {'fp32 s':>7s} {'bf16 s':>7s} {'ratio':>6s} {'agree':>7s} {'differ':>7s} "
          f"{'fp32 Dice':>9s} {'bf16 Dice':>9s}")
    ratios, agreements, truth_dice = [], [], {precision: [] for precision in PRECISIONS}
    for index, case in enumerate(cases):
        image = read_volume(case.image)
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
        labels, seconds = {}, {}
        for precision in PRECISIONS if index % 2 == 0 else PRECISIONS[::-1]:  # alternate who runs first
            start = time.perf_counter()
            labels[precision] = sitk.GetArrayFromImage(segmenters[precision].segment(image))
            seconds[precision] = time.perf_counter() - start
        agreement = min(dice_per_label(labels["bf16"], labels["fp32"], names).values())
        for precision in PRECISIONS:
            truth_dice[precision].append(np.mean(list(dice_per_label(labels[precision], truth, names).values())))
        ratios.append(seconds["fp32"] / seconds["bf16"])
        agreements.append(agreement)
        differ = np.count_nonzero(labels["bf16"] != labels["fp32"])
        print(f"{case.name[:34]:34s} {seconds['fp32']:7.2f} {seconds['bf16']:7.2f} {ratios[-1]:5.2f}x "
              f"{agreement:7.4f} {differ:7d} {truth_dice['fp32'][-1]:9.4f} {truth_dice['bf16'][-1]:9.4f}")
    print(f"median time ratio fp32 / bf16: {statistics.median(ratios):.2f}x; label agreement (Dice bf16 vs fp32, "
          f"worst structure per case): mean {np.mean(agreements):.4f}, worst {min(agreements):.4f}; "
          f"mean Dice vs ground truth: fp32 {np.mean(truth_dice['fp32']):.4f}, "
          f"bf16 {np.mean(truth_dice['bf16']):.4f}")


if __name__ == "__main__":
    main()
