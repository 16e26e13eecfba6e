"""New-structure benchmark (not a test): a user with 1, 3 or 5 labelled volumes of a structure no bundled model
knows (CHAOS abdominal MRI, ACDC cardiac cine MRI), plus unlabelled ones, fine-tunes at the default interactive
budget, starting from the HybridMIM-pretrained CNN or from another structure's model; Dice on held-out volumes.
And the other-scanner case, simulated: a bundled model on volumes with altered intensities (bias field, gamma,
noise), before and after fine-tuning on 3 of them.

Held-out volumes are the validation split of the task's bundled model (its config's seed, fraction and patient
grouping), so they are never trained on by any run here or by that model. Each run fine-tunes through the engine's
own ``fine_tune`` with the automatic method and the default budget (whichever of DEFAULT_MINUTES and
DEFAULT_STEPS comes first) and appends a row to OUTPUT/results.jsonl; rows already there are skipped, so an
interrupted benchmark continues. Minutes budgets are only fair on a quiet machine: each row records the load.

    python Testing/Benchmarks/benchmark_new_structure.py --output runs/new-structure [--tasks chaos_t2 acdc]
        [--counts 1 3 5] [--starts hybridmim-cnn-pretrained la-cnn] [--seeds 0 1 2] [--minutes M]
    python Testing/Benchmarks/benchmark_new_structure.py --output runs/new-structure --other-scanner [--model M]
    python Testing/Benchmarks/benchmark_new_structure.py --output runs/new-structure --report
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import sys
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
TASKS = {"chaos_t2": "abdomen_mri_cnn.json", "acdc": "cardiac_cnn.json"}  # data folder -> its bundled model's config
HELD_OUT = 8  # held-out volumes evaluated per run (the first of the split)
UNLABELED = 8


def task_split(task: str, config: str | None = None) -> dict:
    """The validation split of the task's bundled model (``config``: its training config, default ``TASKS``'s;
    never trained on) and the remaining volumes, as case names."""
    from hybridmim_training.config import SupervisedConfig
    from hybridmim_training.datalist import read_datalist, split_cases

    config_path = REPO / "training" / "configs" / (config or TASKS[task])
    settings = SupervisedConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
    train, validation = split_cases(read_datalist(DATA / task / "dataset.json"), settings.validation_fraction,
                                    settings.settings.seed, settings.group_pattern)
    return {"train": [c.name for c in train], "held_out": [c.name for c in validation][:HELD_OUT],
            "group_pattern": settings.group_pattern}


def label_names(task: str) -> list[str]:
    labels = json.loads((DATA / task / "dataset.json").read_text(encoding="utf-8"))["labels"]
    return [name for value, name in sorted(labels.items(), key=lambda item: int(item[0])) if int(value) > 0]


def volume(task: str, case: str, folder: Path | None = None):
    from hybridmim.cases import LabeledVolume

    root = folder or DATA / task
    return LabeledVolume(case, root / "imagesTr" / f"{case}.nii.gz", DATA / task / "labelsTr" / f"{case}.nii.gz")


def choose(split: dict, count: int, seed: int) -> tuple[list[str], list[str]]:
    """``count`` labelled volumes of different patients and up to UNLABELED unlabelled ones of other patients
    (the model's ``group_pattern`` says which volumes are one patient's: ACDC's two frames)."""
    def patient(name: str) -> str:
        match = re.search(split["group_pattern"], name) if split["group_pattern"] else None
        return match.group(0) if match else name

    patients = sorted({patient(name) for name in split["train"]})
    chosen = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    labeled = [next(n for n in split["train"] if patient(n) == p) for p in chosen[:count]]
    unlabeled = [n for p in chosen[count:] for n in split["train"] if patient(n) == p][:UNLABELED]
    return labeled, unlabeled


def fine_tune_and_measure(model: str, labeled: list, unlabeled: list, held_out: list, names: list[str] | None,
                          seed: int, minutes: float | None, steps: int | None = None, curve_points: int = 0,
                          **overrides) -> dict:
    """Fine-tune with the automatic method (budget: ``minutes`` or ``steps``, default the step cap), then Dice and
    HD95 on ``held_out``. ``curve_points`` > 0: also the held-out Dice (model grid) at that many evenly spaced steps
    ("curve"); ``overrides``: other settings (e.g. ``head_only``)."""
    from hybridmim.evaluation import evaluate
    from hybridmim.finetune import fine_tune
    from hybridmim.inference import Segmenter
    from hybridmim.settings import DEFAULT_STEPS, settings_from

    if curve_points:
        overrides["validate_every"] = max(1, (steps or DEFAULT_STEPS) // curve_points)
    settings = settings_from(None, steps=steps or DEFAULT_STEPS, minutes=minutes, seed=seed, labeled=len(labeled),
                             unlabeled=len(unlabeled), **overrides)
    curve: list[tuple[int, float]] = []
    def record(report) -> None:
        if report.validation_dice is not None:
            curve.append((report.step, round(report.validation_dice, 4)))
    folder = fine_tune(model, [(v.image, v.label) for v in labeled], [v.image for v in unlabeled], settings,
                       validation=[(v.image, v.label) for v in held_out] if curve_points else [],
                       label_names=names, device="cpu", model_id="bench-new-structure", progress=record,
                       status=lambda message: None)
    load = os.getloadavg()[0]
    card = json.loads((folder / "card.json").read_text(encoding="utf-8"))
    report = evaluate(Segmenter(folder, "cpu"), held_out)
    shutil.rmtree(folder)
    return {"method": card["training"]["method"], "steps": card["training"]["steps"],
            "seconds": card["training"]["time_seconds"], "hardware": card["training"]["hardware"],
            "load": round(load, 2), "target_spacing": card["target_spacing"], "patch_size": card["patch_size"],
            "dice": report["dice_mean"], "hd95_mm": report["hd95_mean_mm"], **({"curve": curve} if curve else {})}


def new_structure_runs(args: argparse.Namespace, output: Path) -> None:
    results = output / "results.jsonl"
    done = {json.loads(line)["key"] for line in results.read_text(encoding="utf-8").splitlines()} \
        if results.exists() else set()
    for task in args.tasks:
        split = task_split(task)
        held_out = [volume(task, c) for c in split["held_out"]]
        for count in args.counts:
            for seed in args.seeds:
                labeled, unlabeled = choose(split, count, seed)
                for start in args.starts:
                    key = f"{task}|{start}|{count}|{seed}|{args.minutes}"
                    if key in done:
                        continue
                    row = fine_tune_and_measure(start, [volume(task, c) for c in labeled],
                                                [volume(task, c) for c in unlabeled], held_out, label_names(task),
                                                seed, args.minutes)
                    row.update(key=key, task=task, start=start, labeled=labeled, unlabeled=len(unlabeled), seed=seed)
                    with open(results, "a", encoding="utf-8") as stream:
                        stream.write(json.dumps(row) + "\n")
                    print(f"{key}: Dice {row['dice']['mean']:.3f}, {row['method']}, {row['steps']} steps, "
                          f"{row['seconds']:.0f} s", flush=True)


def other_scanner(output: Path, seed: int, minutes: float | None, model: str) -> None:
    """The cardiac model (``model``: id or folder) on ACDC volumes whose intensities were changed as by another
    scanner (a smooth multiplicative bias field, gamma, Rician-like noise; seeded per case), then fine-tuned on 3
    altered training volumes."""

    from hybridmim.evaluation import evaluate
    from hybridmim.inference import Segmenter

    split = task_split("acdc")
    folder = output / "altered" / "imagesTr"
    labeled, _ = choose(split, 3, seed)
    for case in labeled + split["held_out"]:
        altered(case, folder)
    held_out = [volume("acdc", c, folder.parent) for c in split["held_out"]]
    segmenter = Segmenter(model, "cpu")
    before = evaluate(segmenter, held_out)
    original = evaluate(segmenter, [volume("acdc", c) for c in split["held_out"]])
    after = fine_tune_and_measure(model, [volume("acdc", c, folder.parent) for c in labeled], [], held_out, None,
                                  seed, minutes)
    row = {"model": f"{segmenter.card.id} {segmenter.card.version}", "original_dice": original["dice_mean"],
           "altered_dice": before["dice_mean"], "fine_tuned": after, "labeled": labeled,
           "held_out": split["held_out"]}
    (output / "other_scanner.json").write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
    print(f"{row['model']}: original {original['dice_mean']['mean']:.3f}, altered {before['dice_mean']['mean']:.3f}, "
          f"fine-tuned on 3 altered {after['dice']['mean']:.3f} ({after['steps']} steps)")


def altered(case: str, folder: Path) -> Path:
    """ACDC volume ``case`` as another scanner would show it (``alter``, seeded by the case's name), written once
    into ``folder``."""
    import SimpleITK as sitk

    path = folder / f"{case}.nii.gz"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        image = sitk.ReadImage(str(DATA / "acdc" / "imagesTr" / f"{case}.nii.gz"), sitk.sitkFloat32)
        sitk.WriteImage(alter(image, np.random.default_rng(zlib.crc32(case.encode()))), str(path))
    return path


def altered_acdc(output: Path) -> tuple[dict, Path, list]:
    """Set-up shared by the other-scanner benchmarks: fine-tuned models go under ``output`` (never the user's
    folder); returns the ACDC split, the folder of altered volumes and the altered held-out volumes."""
    logging.basicConfig(level=logging.WARNING)
    os.environ["HYBRIDMIM_USER_MODELS"] = str(output / "models")
    split = task_split("acdc")
    folder = output / "altered" / "imagesTr"
    for case in split["held_out"]:
        altered(case, folder)
    return split, folder, [volume("acdc", case, folder.parent) for case in split["held_out"]]


def read_rows(results: Path) -> list[dict]:
    """The JSON rows a resumable benchmark wrote so far."""
    return [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()] if results.exists() else []


def alter(image, rng: np.random.Generator):
    """Another scanner's intensities: bias field (x0.6-1.4 across the field of view), gamma 0.6-1.6, noise."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image).astype(np.float64)
    high = float(np.percentile(array, 99.5)) or 1.0
    unit = np.clip(array / high, 0, None)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in array.shape], indexing="ij")
    field = 1 + 0.4 * np.tanh(sum(rng.uniform(-1, 1) * g for g in grids))
    gamma = rng.uniform(0.6, 1.6)
    noisy = np.abs(unit ** gamma * field + rng.normal(0, 0.03, array.shape) + 1j * rng.normal(0, 0.03, array.shape))
    out = sitk.GetImageFromArray((noisy * high).astype(np.float32))
    out.CopyInformation(image)
    return out


def report(output: Path) -> None:
    rows = [json.loads(line) for line in (output / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    groups = defaultdict(list)
    for row in rows:
        groups[(row["task"], len(row["labeled"]), row["start"])].append(row)
    print("| task | labelled | start | seeds | method | held-out Dice % (mean ± sd) | steps | seconds | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (task, count, start), members in sorted(groups.items()):
        dice = [100 * m["dice"]["mean"] for m in members]
        sd = statistics.stdev(dice) if len(dice) > 1 else 0.0
        print(f"| {task} | {count} | {start} | {len(members)} | {'/'.join(sorted({m['method'] for m in members}))} "
              f"| {statistics.mean(dice):.1f} ± {sd:.1f} | {round(statistics.mean(m['steps'] for m in members))} "
              f"| {round(statistics.mean(m['seconds'] for m in members))} "
              f"| {max(m['load'] for m in members):.1f} |")
    hardware = sorted({row["hardware"] for row in rows})
    print(f"\nhardware: {hardware}")


def main() -> int:
    from hybridmim.settings import DEFAULT_MINUTES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--counts", nargs="+", type=int, default=[1, 3, 5])
    parser.add_argument("--starts", nargs="+", default=["hybridmim-cnn-pretrained", "la-cnn"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES, help="budget per run (default: the "
                        "interactive default, %(default)s minutes, or its step cap, whichever comes first)")
    parser.add_argument("--other-scanner", action="store_true", help="the simulated other-scanner case instead")
    parser.add_argument("--model", default="cardiac-cnn", help="the cardiac model of --other-scanner (id or folder)")
    parser.add_argument("--report", action="store_true", help="print the table of the runs done so far")
    args = parser.parse_args()
    if args.report:
        report(args.output)
        return 0
    logging.basicConfig(level=logging.WARNING)
    args.output.mkdir(parents=True, exist_ok=True)
    os.environ["HYBRIDMIM_USER_MODELS"] = str(args.output / "models")
    if args.other_scanner:
        other_scanner(args.output, args.seeds[0], args.minutes, args.model)
    else:
        new_structure_runs(args, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
