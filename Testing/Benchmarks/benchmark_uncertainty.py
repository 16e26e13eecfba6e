"""Does the uncertainty score find the volumes a model gets wrong? (not a test)

For each bundled model, every validation case named in its card (never trained on): the uncertainty score
(``hybridmim.uncertainty``) against the Dice with the reference. Prints the Spearman rank correlation between
uncertainty and 1 - Dice, and the mean Dice of the most uncertain quarter of the cases against the rest: a useful
score ranks the volumes worth correcting first.

    python Testing/Benchmarks/benchmark_uncertainty.py [--models hippocampus-cnn la-cnn] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]


def rank_correlation(a: list[float], b: list[float]) -> float:
    """Spearman's rho (no ties expected in continuous scores)."""
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def main() -> int:
    from hybridmim.inference import Segmenter
    from hybridmim.metrics import dice_per_label

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["hippocampus-cnn", "la-cnn"])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print("| model | cases | Spearman (uncertainty, 1 - Dice) | Dice, most uncertain quarter | Dice, the rest |")
    print("|---|---|---|---|---|")
    for model in args.models:
        segmenter = Segmenter(model, args.device)
        values = [label.value for label in segmenter.card.labels]
        scores, dice = [], []
        for name in segmenter.card.metrics["validation_cases"]:
            image = next(args.data.glob(f"*/imagesTr/{name}.nii.gz"))
            reference = sitk.GetArrayFromImage(sitk.ReadImage(str(image.parent.parent / "labelsTr" / image.name)))
            labels, score = segmenter.segment_and_score(sitk.ReadImage(str(image)))
            scores.append(score)
            dice.append(float(np.mean(list(dice_per_label(sitk.GetArrayFromImage(labels), reference,
                                                          values).values()))))
        ranked = np.asarray(dice)[np.argsort(scores)[::-1]]  # most uncertain first
        quarter = max(1, len(scores) // 4)
        print(f"| {model} | {len(scores)} | {rank_correlation(scores, [1 - d for d in dice]):.2f} "
              f"| {ranked[:quarter].mean():.3f} | {ranked[quarter:].mean():.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
