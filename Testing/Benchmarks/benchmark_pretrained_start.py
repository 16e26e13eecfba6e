"""Does HybridMIM pre-training help? (not a test) Pretrained weights against the same network from random weights,
paired by seed: same labelled and unlabelled volumes, same output-layer initialisation, steps, learning rate and
method; only the starting weights differ.

Tasks: structures new to the pretrained model, CHAOS abdominal MRI and ACDC cardiac MRI (1, 3 and 5 labelled
volumes plus unlabelled ones), and the left atrium (4 and 8 labelled). Held-out volumes are the validation split
of each task's bundled model (never trained on; the same helpers as ``benchmark_new_structure.py``); held-out Dice
is also recorded at evenly spaced steps of each run (``curve``, on the model grid). ``--probe``: a frozen linear
probe instead (only the output layer learns; 3 labelled volumes by default). The random twin of the pretrained
model (its card, random weights drawn from the run's seed) is written once per seed under OUTPUT/starts/. One JSON
row per run in OUTPUT/pretrained_start.jsonl; rows already there are skipped, so an interrupted run continues.

    python Testing/Benchmarks/benchmark_pretrained_start.py --output runs/pretrained-start \\
        --pretrained runs/pretrain-cnn-2/model [--tasks chaos_t2 acdc la] [--counts 1 3 5] [--la-counts 4 8] \\
        [--seeds 0 1 2 3 4] [--steps 300] [--probe]
    python Testing/Benchmarks/benchmark_pretrained_start.py --output runs/pretrained-start --report

The report gives, per cell, both means and the paired difference (pretrained - random) with its 95 % confidence
interval (Student's t over the seeds).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from benchmark_new_structure import TASKS, choose, fine_tune_and_measure, label_names, read_rows, task_split, volume

CONFIGS = {**TASKS, "la": "la_cnn.json"}  # data folder -> the config whose validation split is held out
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 24: 2.064, 29: 2.045}


def random_twin(pretrained: Path, seed: int, output: Path) -> Path:
    """The pretrained model's card with random weights (torch seed ``seed``), written once; its output layer is
    left out as in the pretrained folder, so fine-tuning makes it the same way for both starts."""
    import torch

    from hybridmim.model_card import WEIGHTS_FILE, ModelCard
    from hybridmim.model_store import save_model
    from hybridmim.networks import build_network, output_layer_names

    folder = output / "starts" / f"random-{pretrained.name}-seed{seed}"
    if folder.exists():
        return folder
    card = ModelCard.load(pretrained)
    name, args = card.architecture["name"], card.architecture.get("args", {})
    torch.manual_seed(seed)
    network = build_network(name, card.in_channels, card.out_channels, **args)
    head = output_layer_names(name, card.in_channels, card.out_channels, **args)
    card.weights = {"file": WEIGHTS_FILE, "sha256": ""}
    card.training = {"initialisation": f"random (torch seed {seed}), the architecture of {card.id} {card.version}"}
    return save_model(folder, {k: v for k, v in network.state_dict().items() if k not in head}, card)


def runs(args: argparse.Namespace) -> None:
    results = args.output / "pretrained_start.jsonl"
    done = {row["key"] for row in read_rows(results)}
    for task in args.tasks:
        split = task_split(task, CONFIGS[task])
        held_out = [volume(task, c) for c in split["held_out"]]
        counts = [3] if args.probe else args.la_counts if task == "la" else args.counts
        for count in counts:
            for seed in args.seeds:
                labeled, unlabeled = choose(split, count, seed)
                for start in ("pretrained", "random"):
                    key = f"{task}|{count}|{seed}|{args.steps}|{'probe' if args.probe else 'fine-tune'}|{start}"
                    if key in done:
                        continue
                    model = args.pretrained if start == "pretrained" else random_twin(args.pretrained, seed,
                                                                                       args.output)
                    row = fine_tune_and_measure(str(model), [volume(task, c) for c in labeled],
                                                [] if args.probe else [volume(task, c) for c in unlabeled],
                                                held_out, label_names(task), seed, None, args.steps,
                                                curve_points=5, head_only=args.probe)
                    row.update(key=key, task=task, count=count, seed=seed, start=start, probe=args.probe,
                               budget_steps=args.steps, pretrained=str(args.pretrained), labeled=labeled)
                    with open(results, "a", encoding="utf-8") as stream:
                        stream.write(json.dumps(row) + "\n")
                    print(f"{key}: Dice {row['dice']['mean']:.3f} ({row['method']}, {row['steps']} steps, "
                          f"{row['seconds']:.0f} s)", flush=True)


def interval(differences: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95 % confidence interval (Student's t; 0 for one value)."""
    mean = statistics.mean(differences)
    if len(differences) < 2:
        return mean, 0.0
    df = len(differences) - 1
    t = T_975.get(df) or next((T_975[k] for k in sorted(T_975) if k >= df), 1.96)
    return mean, t * statistics.stdev(differences) / len(differences) ** 0.5


def report(output: Path) -> None:
    cells: dict[tuple, dict[int, dict[str, float]]] = defaultdict(dict)
    for row in read_rows(output / "pretrained_start.jsonl"):
        cell = (row["task"], row["count"], "probe" if row["probe"] else "fine-tune", row["budget_steps"])
        cells[cell].setdefault(row["seed"], {})[row["start"]] = 100 * row["dice"]["mean"]
    print("| task | labelled | kind | steps | seeds | pretrained Dice % | random Dice % | paired difference "
          "(95 % CI) |")
    print("|---|---|---|---|---|---|---|---|")
    for cell, seeds in sorted(cells.items()):
        pairs = [(s["pretrained"], s["random"]) for s in seeds.values() if len(s) == 2]
        if not pairs:
            continue
        mean, half = interval([p - r for p, r in pairs])
        print(f"| {' | '.join(map(str, cell))} | {len(pairs)} | {statistics.mean(p for p, _ in pairs):.1f} | "
              f"{statistics.mean(r for _, r in pairs):.1f} | {mean:+.1f} ± {half:.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--pretrained", type=Path, help="the pretrained model folder (required unless --report)")
    parser.add_argument("--tasks", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--counts", nargs="+", type=int, default=[1, 3, 5], help="labelled volumes, CHAOS and ACDC")
    parser.add_argument("--la-counts", nargs="+", type=int, default=[4, 8], help="labelled volumes, left atrium")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=300, help="steps per run, both starts")
    parser.add_argument("--probe", action="store_true", help="frozen linear probe on 3 labelled volumes")
    parser.add_argument("--report", action="store_true", help="print the paired table of the runs so far")
    args = parser.parse_args()
    if args.report:
        report(args.output)
        return 0
    if args.pretrained is None:
        parser.error("--pretrained is required")
    logging.basicConfig(level=logging.WARNING)
    args.output.mkdir(parents=True, exist_ok=True)
    os.environ["HYBRIDMIM_USER_MODELS"] = str(args.output / "models")
    runs(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
