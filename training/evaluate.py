"""Evaluate a model folder on labelled cases with the engine's own inference path: per-case Dice and HD95 to
CSV/JSON, and a plot."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hybridmim.imageio import read_volume
from hybridmim.inference import Segmenter
from hybridmim.metrics import dice_per_label, hausdorff95

from .datalist import CasePaths

logger = logging.getLogger(__name__)


def evaluate(segmenter: Segmenter, cases: list[CasePaths]) -> dict:
    """Per-case Dice and HD95 (mm) per structure, on each case's original grid; means over cases."""
    names = segmenter.card.label_names()
    rows = []
    for case in cases:
        predicted = segmenter.segment(read_volume(case.image))
        reference = sitk.Cast(read_volume(case.label), sitk.sitkUInt8)
        reference.CopyInformation(predicted)
        dice = dice_per_label(sitk.GetArrayViewFromImage(predicted), sitk.GetArrayViewFromImage(reference),
                              list(names))
        row = {"case": case.name, **{names[v]: round(s, 4) for v, s in dice.items()}}
        row.update({f"{names[v]} HD95": round(hausdorff95(predicted, reference, v), 2) for v in names})
        rows.append(row)
        logger.info("%s %s", case.name, row)
    mean = {name: round(float(np.mean([row[name] for row in rows])), 4) for name in names.values()}
    mean["mean"] = round(float(np.mean(list(mean.values()))), 4)
    hd95 = {name: round(float(np.nanmean([row[f"{name} HD95"] for row in rows])), 2) for name in names.values()}
    return {"cases": rows, "dice_mean": mean, "hd95_mean_mm": hd95}


def write_report(report: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    with open(folder / "evaluation.csv", "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(report["cases"][0]))
        writer.writeheader()
        writer.writerows(report["cases"])
    _plot(report, folder / "evaluation.png")


def _plot(report: dict, path: Path) -> None:
    """Per-case Dice per structure as a box plot (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot")
        return
    names = [name for name in report["dice_mean"] if name != "mean"]
    figure, axes = plt.subplots(figsize=(1.5 + 1.6 * len(names), 4))
    axes.boxplot([[row[name] for row in report["cases"]] for name in names])
    axes.set_xticks(range(1, len(names) + 1), names)
    axes.set_ylabel("Dice")
    axes.set_ylim(0, 1)
    axes.set_title(f"{len(report['cases'])} cases, mean Dice {report['dice_mean']['mean']:.3f}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
