"""Fine-tuning benchmark (not a test) on the left atrium (../shared/data/la): supervised-only vs Mean Teacher vs
BCP, at equal steps and at equal minutes, over seeds, through the engine's own ``fine_tune``.

Plans:
- ``standard``: the literature's 4-, 8- and 16-labelled subsets; every other case of the 80 is unlabelled, except
  a validation split held out from all of them. Starts from random initialisation (a fresh network per seed, the
  ``RANDOM_START`` CNN) and, with ``--pretrained FOLDER``, from HybridMIM-pretrained weights and from a fresh
  network of the pretrained model's own architecture and preprocessing (``scratch:``), so that comparison
  differs only in the starting weights.
- ``interactive``: the product's use: 1, 3 or 5 labelled volumes and 10 unlabelled ones, starting from the bundled
  model of another structure (hippocampus-cnn: a new output layer is made), at the minutes budget or, with
  ``--round-steps``, at each method's steps in that many minutes on a quiet machine (so a busy machine can run it).

``--variant TAG JSON`` runs the methods with settings changed (e.g. ``rotflip '{"rot90_axis": 2, "flip_axes":
[0, 1]}'``); its rows are keyed and reported as ``method [TAG]``.

Dice is measured with the engine's inference on each case's original grid, on the held-out validation cases and
on (up to) 10 of the run's unlabelled volumes, with the fine-tuned card's post-processing (its row's
``largest_component``: the labels whose largest piece alone is kept). Every run appends a line to
OUTPUT/results.jsonl and is skipped when already there, so an interrupted benchmark continues where it stopped.

    python Testing/Benchmarks/benchmark_finetuning.py --output runs/finetune-benchmark [--plan standard interactive]
        [--subsets 8 4 16] [--interactive 3 1 5] [--seeds 0 1 2] [--steps 600] [--minutes 2] [--pretrained FOLDER]
        [--starts random pretrained scratch] [--methods supervised mean-teacher bcp]
        [--round-steps supervised=3000 bcp=1900] [--variant TAG JSON]
    python Testing/Benchmarks/benchmark_finetuning.py --output runs/finetune-benchmark --report

Equal-minutes runs are only fair on a machine running nothing else: each row records the load average when its
training ended. ``--move-busy`` (while the benchmark is not running) sets aside the equal-minutes rows whose load
was above ``--quiet-load`` so the next run repeats them; ``--budgets steps`` runs only the equal-steps runs, which
any load leaves valid (their Dice; their seconds are reported from quiet runs only).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
VALIDATION_CASES = 12
EVALUATED_UNLABELED = 10
METHODS = ("supervised", "mean-teacher", "bcp")
# The random start of the recorded standard-plan runs: la_cnn.json's labels with this network and preprocessing.
RANDOM_START = {"architecture": {"name": "unet", "args": {"channels": [16, 32, 64, 128, 256],
                                                         "strides": [2, 2, 2, 2], "num_res_units": 2}},
                "intensity": {"method": "zscore"}, "target_spacing": [1.0, 1.0, 1.0], "patch_size": [64, 64, 48]}


def split(data: Path) -> dict:
    """Case ids: the labelled subsets, a validation split (seed 0) disjoint from every subset, the rest."""
    dataset = json.loads((data / "dataset.json").read_text(encoding="utf-8"))
    ids = sorted(Path(entry["image"]).name.split(".")[0] for entry in dataset["training"])
    subsets = {int(n): list(cases) for n, cases in dataset["labeled_subsets"].items()}
    in_subsets = set().union(*subsets.values())
    outside = [i for i in ids if i not in in_subsets]
    rng = np.random.default_rng(0)
    validation = sorted(rng.choice(outside, VALIDATION_CASES, replace=False).tolist())
    pool = [i for i in ids if i not in validation]
    free = [i for i in pool if i not in in_subsets]
    return {"subsets": subsets, "validation": validation, "pool": pool,
            "interactive_unlabeled": sorted(rng.choice(free, EVALUATED_UNLABELED, replace=False).tolist())}


def runs(args: argparse.Namespace, cases: dict) -> list[dict]:
    """Every run of the requested plans, most informative first."""
    planned = []
    starts = [start if start == "random" else f"{start}:{args.pretrained}" for start in args.starts
              if start == "random" or args.pretrained]
    if "standard" in args.plan:
        for count in args.subsets:
            labeled = cases["subsets"][count]
            unlabeled = [i for i in cases["pool"] if i not in labeled]
            for start in starts:
                for seed in args.seeds:
                    for budget in [b for b in (("steps", args.steps), ("minutes", args.minutes))
                                   if b[0] in args.budgets]:
                        for method in args.methods:
                            planned.append({"plan": "standard", "start": start, "labeled": labeled,
                                            "unlabeled": unlabeled, "method": method, "budget": budget,
                                            "seed": seed})
    if "interactive" in args.plan:
        round_steps = {method: int(steps) for method, _, steps in (item.partition("=") for item in args.round_steps)}
        if round_steps and set(args.methods) - set(round_steps):
            raise SystemExit(f"--round-steps gives no steps for {sorted(set(args.methods) - set(round_steps))}")
        for count in args.interactive:
            labeled = cases["subsets"][8][:count]
            for seed in args.seeds:
                for method in args.methods:
                    budget = ("steps", round_steps[method]) if round_steps else ("minutes", args.minutes)
                    planned.append({"plan": "interactive", "start": "hippocampus-cnn", "labeled": labeled,
                                    "unlabeled": cases["interactive_unlabeled"], "method": method,
                                    "budget": budget, "seed": seed})
    if args.variant:
        tag, overrides = args.variant[0], json.loads(args.variant[1])
        planned = [{**run, "variant": tag, "overrides": overrides} for run in planned]
    return planned


def run_key(run: dict) -> str:
    method = f"{run['method']} [{run['variant']}]" if run.get("variant") else run["method"]
    return "|".join(str(x) for x in (run["plan"], run["start"], len(run["labeled"]), method, *run["budget"],
                                     run["seed"]))


def start_model(run: dict, output: Path) -> tuple[str, list[str] | None]:
    """The model folder or id a run starts from, and the label names when they differ from its own."""
    from hybridmim.model_card import WEIGHTS_FILE, ModelCard
    from hybridmim.model_store import save_model
    from hybridmim.networks import build_network

    if run["start"] == "hippocampus-cnn":
        return "hippocampus-cnn", ["left atrium"]
    kind, _, pretrained = run["start"].partition(":")
    if kind == "pretrained":
        return pretrained, ["left atrium"]
    folder = output / "starts" / (f"random-seed{run['seed']}" if kind == "random"
                                  else f"scratch-{Path(pretrained).name}-seed{run['seed']}")
    if not folder.exists():
        import torch

        config = json.loads((REPO / "training" / "configs" / "la_cnn.json").read_text(encoding="utf-8"))
        own = RANDOM_START if kind == "random" else {
            key: value for key, value in json.loads((Path(pretrained) / "card.json").read_text(encoding="utf-8"))
            .items() if key in RANDOM_START}
        card = ModelCard.from_dict({**config["card"], **own, "weights": {"file": WEIGHTS_FILE, "sha256": ""}})
        card.training = {"initialisation": f"random (torch seed {run['seed']})"}
        torch.manual_seed(run["seed"])
        network = build_network(card.architecture["name"], 1, card.out_channels, **card.architecture["args"])
        save_model(folder, network, card)
    return str(folder), None


def execute(run: dict, data: Path, output: Path, validation: list[str]) -> dict:
    from hybridmim.cases import LabeledVolume
    from hybridmim.evaluation import evaluate
    from hybridmim.finetune import fine_tune
    from hybridmim.inference import Segmenter
    from hybridmim.settings import settings_from

    def volume(case: str) -> LabeledVolume:
        return LabeledVolume(case, data / "imagesTr" / f"{case}.nii.gz", data / "labelsTr" / f"{case}.nii.gz")

    model, label_names = start_model(run, output)
    kind, amount = run["budget"]
    settings = settings_from(run["method"], steps=amount if kind == "steps" else None,
                             minutes=amount if kind == "minutes" else None, seed=run["seed"],
                             **run.get("overrides", {}))
    labeled = [(v.image, v.label) for v in map(volume, run["labeled"])]
    unlabeled = [volume(case).image for case in run["unlabeled"]] if run["method"] != "supervised" else []
    folder = fine_tune(model, labeled, unlabeled, settings, label_names=label_names, device="cpu",
                       model_id=f"bench-{run['plan']}", status=lambda message: None)
    load = os.getloadavg()[0]  # > CPU count: something else ran beside it (time-budgeted runs did fewer steps)
    card = json.loads((folder / "card.json").read_text(encoding="utf-8"))
    segmenter = Segmenter(folder, "cpu")
    on_validation = evaluate(segmenter, [volume(c) for c in validation])
    on_unlabeled = evaluate(segmenter, [volume(c) for c in run["unlabeled"][:EVALUATED_UNLABELED]])
    shutil.rmtree(folder)
    return {"key": run_key(run), "plan": run["plan"], "start": run["start"], "labeled": len(run["labeled"]),
            "unlabeled": len(run["unlabeled"]), "method": run["method"], "variant": run.get("variant"),
            "budget": list(run["budget"]),
            "seed": run["seed"], "steps": card["training"]["steps"], "seconds": card["training"]["time_seconds"],
            "hardware": card["training"]["hardware"], "load": round(load, 2),
            "largest_component": card.get("inference", {}).get("largest_component", []),
            "validation_dice": on_validation["dice_mean"]["mean"], "validation_hd95": on_validation["hd95_mean_mm"],
            "unlabeled_dice": on_unlabeled["dice_mean"]["mean"]}


def move_busy(output: Path, quiet_load: float, plans: list[str]) -> None:
    """Move equal-minutes runs that shared the CPU (load above ``quiet_load`` when training ended: fewer steps in
    their minutes) to contended.jsonl, so the next run of this script does them again. Not while it runs."""
    lines = (output / "results.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    busy = [line for line, row in zip(lines, rows)
            if row["plan"] in plans and row["budget"][0] == "minutes" and row["load"] > quiet_load]
    with open(output / "contended.jsonl", "a", encoding="utf-8") as stream:
        stream.writelines(line + "\n" for line in busy)
    (output / "results.jsonl").write_text("".join(line + "\n" for line in lines if line not in busy), encoding="utf-8")
    print(f"moved {len(busy)} equal-minutes runs with load > {quiet_load} to contended.jsonl")


def report(output: Path, quiet_load: float) -> None:
    """Markdown tables: mean +- sd over seeds of validation and unlabelled-volume Dice, steps, and seconds (from
    the runs that had the CPU to themselves only)."""
    rows = [json.loads(line) for line in (output / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    groups = defaultdict(list)
    for row in rows:
        method = f"{row['method']} [{row['variant']}]" if row.get("variant") else row["method"]
        groups[(row["plan"], row["start"], row["labeled"], f"{row['budget'][1]} {row['budget'][0]}",
                method)].append(row)

    def spread(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"

    def seconds(members: list[dict]) -> str:
        quiet = [m["seconds"] for m in members if m["load"] <= quiet_load]
        return f"{round(statistics.mean(quiet))}" if quiet else "(busy CPU)"

    def largest_piece(members: list[dict]) -> str:
        """Whether the runs' models kept only the largest piece ('?' for rows from before the field existed)."""
        kept = {("yes" if m["largest_component"] else "no") if "largest_component" in m else "?" for m in members}
        return "/".join(sorted(kept))

    print("| plan | start | labelled | budget | method | seeds | validation Dice % | unlabelled Dice % "
          "| steps | seconds | largest piece |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (plan, start, labeled, budget, method), members in sorted(groups.items(), key=lambda kv: (
            kv[0][0], kv[0][1], kv[0][2], kv[0][3], METHODS.index(kv[0][4].split()[0]), kv[0][4])):
        print(f"| {plan} | {start} | {labeled} | {budget} | {method} | {len(members)} "
              f"| {spread([m['validation_dice'] for m in members])} "
              f"| {spread([m['unlabeled_dice'] for m in members])} "
              f"| {round(statistics.mean(m['steps'] for m in members))} | {seconds(members)} "
              f"| {largest_piece(members)} |")
    print(f"\nhardware: {sorted({row['hardware'] for row in rows})}; CPU load at the end of training: "
          f"{min(row['load'] for row in rows):.1f} to {max(row['load'] for row in rows):.1f}")
    paired_starts(rows)


def paired_starts(rows: list[dict]) -> None:
    """Pretrained minus random weights of the same architecture (``scratch:``), per run whose twin (same subset,
    method, budget and seed) exists: held-out Dice points per seed, then pooled over all pairs."""
    by_key = {(row["start"], row["labeled"], row["method"], tuple(row["budget"]), row["seed"]): row for row in rows}
    groups = defaultdict(list)
    for (start, labeled, method, budget, seed), row in sorted(by_key.items()):
        kind, _, folder = start.partition(":")
        twin = by_key.get((f"scratch:{folder}", labeled, method, budget, seed))
        if kind == "pretrained" and twin is not None:
            groups[(labeled, f"{budget[1]} {budget[0]}", method)].append(
                100 * (row["validation_dice"] - twin["validation_dice"]))
    if not groups:
        return
    print("\n| labelled | budget | method | pretrained - random weights, held-out Dice points per seed |")
    print("|---|---|---|---|")
    for (labeled, budget, method), differences in sorted(groups.items()):
        print(f"| {labeled} | {budget} | {method} | {', '.join(f'{d:+.1f}' for d in differences)} |")
    pooled = [d for differences in groups.values() for d in differences]
    sd = statistics.stdev(pooled) if len(pooled) > 1 else 0.0
    print(f"\nall {len(pooled)} pairs: {statistics.mean(pooled):+.1f} ± {sd:.1f} points (mean ± sd), "
          f"pretrained ahead in {sum(d > 0 for d in pooled)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "la")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--plan", nargs="+", default=["standard", "interactive"], choices=["standard", "interactive"])
    parser.add_argument("--subsets", nargs="+", type=int, default=[8, 4, 16])
    parser.add_argument("--interactive", nargs="+", type=int, default=[3, 1, 5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600, help="the equal-steps budget")
    parser.add_argument("--minutes", type=float, default=2.0, help="the equal-minutes budget")
    parser.add_argument("--budgets", nargs="+", default=["steps", "minutes"], choices=["steps", "minutes"],
                        help="standard plan: which budgets to run (equal-steps runs tolerate a busy machine, "
                             "equal-minutes runs do not)")
    parser.add_argument("--pretrained", help="HybridMIM-pretrained model folder (adds the pretrained start)")
    parser.add_argument("--starts", nargs="+", default=["random", "pretrained", "scratch"],
                        choices=["random", "pretrained", "scratch"],
                        help="standard plan: which starts to run (pretrained and scratch need --pretrained)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--round-steps", nargs="+", default=[], metavar="METHOD=STEPS",
                        help="interactive plan: a steps budget per method (each method's steps in the round's "
                             "minutes on a quiet machine) instead of the minutes")
    parser.add_argument("--variant", nargs=2, metavar=("TAG", "JSON"),
                        help="settings overriding the methods' own (rows keyed and reported as 'method [TAG]')")
    parser.add_argument("--report", action="store_true", help="print the tables of the runs done so far")
    parser.add_argument("--move-busy", action="store_true",
                        help="move equal-minutes runs that shared the CPU to contended.jsonl (to be run again)")
    parser.add_argument("--quiet-load", type=float, default=(os.cpu_count() or 1) + 0.3,
                        help="1-minute load average above which a run shared the CPU (default: CPUs + 0.3)")
    args = parser.parse_args()
    if args.move_busy:
        move_busy(args.output, args.quiet_load, args.plan)
        return 0
    if args.report:
        report(args.output, args.quiet_load)
        return 0
    logging.basicConfig(level=logging.WARNING)
    args.output.mkdir(parents=True, exist_ok=True)
    os.environ["HYBRIDMIM_USER_MODELS"] = str(args.output / "models")
    cases = split(args.data)
    (args.output / "split.json").write_text(json.dumps(cases, indent=2) + "\n", encoding="utf-8")
    results = args.output / "results.jsonl"
    done = {json.loads(line)["key"] for line in results.read_text(encoding="utf-8").splitlines()} \
        if results.exists() else set()
    planned = [run for run in runs(args, cases) if run_key(run) not in done]
    print(f"{len(planned)} runs to do ({len(done)} already done)", flush=True)
    for index, run in enumerate(planned, 1):
        row = execute(run, args.data, args.output, cases["validation"])
        with open(results, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(row) + "\n")
        print(f"[{index}/{len(planned)}] {row['key']}: validation Dice {row['validation_dice']:.3f}, unlabelled "
              f"{row['unlabeled_dice']:.3f}, {row['steps']} steps, {row['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
