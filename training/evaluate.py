"""Evaluate a model folder on labelled cases with the engine's own inference path: per-case Dice to CSV/JSON."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hybridmim.imageio import read_volume
from hybridmim.inference import Segmenter
from hybridmim.metrics import dice_per_label

from .datalist import CasePaths

logger = logging.getLogger(__name__)


def evaluate(segmenter: Segmenter, cases: list[CasePaths]) -> dict:
    """Per-case and mean Dice per structure, computed on each case's original grid."""
    names = segmenter.card.label_names()
    rows = []
    for case in cases:
        prediction = sitk.GetArrayFromImage(segmenter.segment(read_volume(case.image)))
        reference = sitk.GetArrayFromImage(read_volume(case.label)).astype(np.uint8)
        scores = dice_per_label(prediction, reference, list(names))
        rows.append({"case": case.name, **{names[v]: round(s, 4) for v, s in scores.items()}})
        logger.info("%s %s", case.name, rows[-1])
    mean = {name: round(float(np.mean([row[name] for row in rows])), 4) for name in names.values()}
    mean["mean"] = round(float(np.mean(list(mean.values()))), 4)
    return {"cases": rows, "dice_mean": mean}


def write_report(report: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    with open(folder / "evaluation.csv", "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(report["cases"][0]))
        writer.writeheader()
        writer.writerows(report["cases"])
