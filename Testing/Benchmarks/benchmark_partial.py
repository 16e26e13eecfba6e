"""Partly corrected volumes (not a test): fine-tuning on 5, 10 or 20 corrected slices against whole corrected
volumes, at the same default interactive budget.

The other-scanner case of ``benchmark_new_structure.py`` (the cardiac model on ACDC volumes with altered
intensities), where the model's output is worth correcting: the model segments the altered training volumes; a
user corrects the slices it gets most wrong first (the reference label replaces its output there), and the
command line's rule (``hybridmim.partial``) turns each into a partly reviewed label map. The whole-volume rows
correct 1 and 3 volumes entirely. The other altered training volumes are unlabelled. Dice on the altered held-out
volumes (the bundled model's validation split, never trained on); one JSON row per run in
OUTPUT/partial.jsonl, rows already there skipped.

    python Testing/Benchmarks/benchmark_partial.py --output runs/new-structure [--slices 5 10 20] [--seeds 0 1 2]
        [--model cardiac-cnn]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import SimpleITK as sitk
from benchmark_new_structure import DATA, altered, altered_acdc, choose, fine_tune_and_measure, read_rows, volume


def corrected_slices(segmenter, cases: list[str], folder: Path, budget: int | None) -> list:
    """(image, label) per case that gets corrected slices: the worst slices of all cases first (most wrong voxels),
    ``budget`` slices in all (None: every slice of every case, i.e. whole volumes)."""
    from hybridmim.partial import partly_reviewed

    outputs, errors = {}, []
    for case in cases:
        image = sitk.ReadImage(str(folder / f"{case}.nii.gz"))
        output = segmenter.segment(image)
        truth = sitk.ReadImage(str(DATA / "acdc" / "labelsTr" / f"{case}.nii.gz"))
        wrong = (sitk.GetArrayViewFromImage(output) != sitk.GetArrayViewFromImage(truth)).sum(axis=(1, 2))
        outputs[case] = (output, truth)
        errors += [(int(count), case, z) for z, count in enumerate(wrong) if count]
    chosen: dict[str, list[int]] = {}
    for _, case, z in sorted(errors, reverse=True)[:budget]:
        chosen.setdefault(case, []).append(z)
    pairs = []
    for case, slices in chosen.items():
        output, truth = outputs[case]
        labels = sitk.GetArrayFromImage(output)
        labels[slices] = sitk.GetArrayViewFromImage(truth)[slices]
        corrected = sitk.GetImageFromArray(labels)
        corrected.CopyInformation(output)
        label = corrected if budget is None else partly_reviewed(corrected, output, case, axis=2)[0]
        pairs.append(replace(volume("acdc", case, folder.parent), label=label))
    return pairs


def main() -> int:

    from hybridmim.inference import Segmenter
    from hybridmim.settings import DEFAULT_MINUTES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--slices", nargs="+", type=int, default=[5, 10, 20])
    parser.add_argument("--volumes", nargs="+", type=int, default=[1, 3], help="whole corrected volumes to compare")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--model", default="cardiac-cnn")
    args = parser.parse_args()
    split, folder, held_out = altered_acdc(args.output)
    results = args.output / "partial.jsonl"
    done = {row["key"] for row in read_rows(results)}
    segmenter = Segmenter(args.model, "cpu")
    for seed in args.seeds:
        chosen, unlabeled = choose(split, 3, seed)
        for case in chosen + unlabeled:
            altered(case, folder)
        runs = [("slices", n, chosen) for n in args.slices] + [("volumes", n, chosen[:n]) for n in args.volumes]
        for kind, count, cases in runs:
            key = f"{args.model}|{kind}|{count}|{seed}"
            if key in done:
                continue
            labeled = corrected_slices(segmenter, cases, folder, count if kind == "slices" else None)
            row = fine_tune_and_measure(args.model, labeled, [volume("acdc", c, folder.parent) for c in unlabeled],
                                        held_out, None, seed, DEFAULT_MINUTES)
            row.update(key=key, kind=kind, count=count, seed=seed, corrected_cases=cases)
            with open(results, "a", encoding="utf-8") as stream:
                stream.write(json.dumps(row) + "\n")
            print(f"{key}: Dice {row['dice']['mean']:.3f} ({row['method']}, {row['steps']} steps)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
