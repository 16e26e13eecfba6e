"""Write an evaluation (``hybridmim.evaluation.evaluate``) as CSV/JSON and a plot."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


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
