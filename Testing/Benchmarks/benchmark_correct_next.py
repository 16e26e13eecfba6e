"""Is the most uncertain volume the one worth correcting? (not a test)

The other-scanner case of ``benchmark_new_structure.py`` (the cardiac model on ACDC volumes with altered
intensities): a pool of altered training volumes is ranked by the model's uncertainty (``hybridmim rank``); the
model is fine-tuned, at the default interactive budget and per seed, on the most uncertain volume (corrected in
full) and on a volume drawn at random from the rest of the pool. Dice on the altered held-out volumes (the bundled
model's validation split, never trained on) before and after; one JSON row per run in OUTPUT/correct_next.jsonl,
rows already there skipped.

    python Testing/Benchmarks/benchmark_correct_next.py --output runs/new-structure [--seeds 0 1 2] [--pool 8]
        [--model cardiac-cnn]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from benchmark_new_structure import altered, altered_acdc, choose, fine_tune_and_measure, read_rows, volume


def main() -> int:
    from hybridmim.evaluation import evaluate
    from hybridmim.inference import Segmenter
    from hybridmim.settings import DEFAULT_MINUTES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--pool", type=int, default=8, help="candidate volumes to rank")
    parser.add_argument("--model", default="cardiac-cnn")
    args = parser.parse_args()
    split, folder, held_out = altered_acdc(args.output)
    results = args.output / "correct_next.jsonl"
    rows = read_rows(results)
    segmenter = Segmenter(args.model, "cpu")
    before = evaluate(segmenter, held_out)["dice_mean"]["mean"]
    _, pool = choose(split, 0, 0)
    pool = pool[:args.pool]
    scores = {case: segmenter.segment_and_score(sitk.ReadImage(str(altered(case, folder))))[1] for case in pool}
    ranked = sorted(pool, key=lambda case: -scores[case])
    print(f"{args.model} before: Dice {before:.3f}; most uncertain {ranked[0]} ({scores[ranked[0]]:.3f}), "
          f"least {ranked[-1]} ({scores[ranked[-1]]:.3f})", flush=True)
    picks = [(rule, seed, case) for seed in args.seeds for rule, case in (
        ("most uncertain", ranked[0]), ("random", ranked[1:][np.random.default_rng(seed).integers(len(ranked) - 1)]))]
    done = {row["key"] for row in rows}
    for rule, seed, case in picks:
        key = f"{args.model}|{rule}|{seed}"
        if key in done:
            continue
        row = fine_tune_and_measure(args.model, [volume("acdc", case, folder.parent)], [], held_out, None, seed,
                                    DEFAULT_MINUTES)
        row.update(key=key, rule=rule, seed=seed, case=case, uncertainty=scores[case], dice_before=before)
        rows.append(row)
        with open(results, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(row) + "\n")
        print(f"{key}: {case} (uncertainty {scores[case]:.3f}) -> Dice {row['dice']['mean']:.3f} "
              f"(gain {row['dice']['mean'] - before:+.3f})", flush=True)
    for rule in ("most uncertain", "random"):
        gains = [row["dice"]["mean"] - row["dice_before"] for row in rows if row["rule"] == rule]
        if gains:
            print(f"{rule}: mean gain {statistics.mean(gains):+.3f} over {len(gains)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
