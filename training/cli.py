"""``hybridmim-train``: train and evaluate models offline."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from hybridmim.errors import HybridMIMError

from .config import read_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hybridmim-train", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("supervised", help="supervised training from an MSD-style dataset.json")
    train.add_argument("--config", type=Path, required=True, help="config JSON: {\"card\": ..., \"training\": ...} "
                       "(hybridmim_training.config; training/configs/ has examples)")
    train.add_argument("--dataset", type=Path, required=True, help="MSD-style dataset.json")
    train.add_argument("--output", type=Path, required=True, help="new model folder to create")
    train.add_argument("--steps", type=int, help="override the config's number of steps")
    train.add_argument("--device", default="auto", help="auto, cpu or cuda")
    train.add_argument("--log-dir", type=Path, help="folder for the loss log and the validation report")
    train.add_argument("--init", help="start from this model folder or id (e.g. a HybridMIM-pretrained model)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the checkpoint in --log-dir (written every 500 steps; the config's "
                            "'checkpoint_every' changes that) after an interruption, with the same settings")

    evaluation = commands.add_parser("evaluate", help="Dice of a model on a dataset's validation or all cases")
    evaluation.add_argument("--model", required=True, help="model id or folder")
    evaluation.add_argument("--dataset", type=Path, required=True)
    evaluation.add_argument("--cases", nargs="*", help="case names to evaluate (default: all labelled cases)")
    evaluation.add_argument("--output", type=Path, required=True, help="folder for evaluation.json/.csv")
    evaluation.add_argument("--device", default="auto")

    pre = commands.add_parser("pretrain", help="HybridMIM self-supervised pre-training (torchrun for several GPUs)")
    pre.add_argument("--config", type=Path, required=True,
                     help="config JSON: {\"card\": ..., \"pretraining\": ..., \"data\": ...} "
                          "(hybridmim_training.config)")
    pre.add_argument("--output", type=Path, required=True, help="run folder: checkpoint, logs, exported model/")
    pre.add_argument("--device", default="auto", help="auto, cpu or cuda")
    pre.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    pre.add_argument("--stop-after", type=int, help="end this run after N steps (resume later)")

    plan = commands.add_parser("plan", help="show the plan (spacing, patch, pooling, normalisation) that "
                               "supervised training makes for a dataset when its config leaves them out")
    plan.add_argument("--dataset", type=Path, required=True, help="MSD-style dataset.json")
    plan.add_argument("--config", type=Path, help="a supervised config: its training split and network, as "
                      "training plans them (default: all labelled cases)")
    plan.add_argument("--network", default="unet", help="without --config: unet (pooling planned per axis), "
                      "basicunet or swinunetr (fixed pooling: patch sides multiples of 16 or 32)")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command == "supervised":
            from .supervised import train_supervised

            if args.resume and not args.log_dir:
                raise HybridMIMError("--resume needs --log-dir: the checkpoint is kept there")
            if args.log_dir:
                args.log_dir.mkdir(parents=True, exist_ok=True)
            folder = train_supervised(read_config(args.config), args.dataset, args.output,
                                      args.device, args.log_dir, args.steps, args.init, args.resume)
            print(f"Model written to {folder}")
        elif args.command == "plan":
            print(json.dumps(dataset_plan(args.dataset, args.config, args.network), indent=2))
        elif args.command == "pretrain":
            from .pretraining.pretrain import pretrain

            folder = pretrain(read_config(args.config), args.output, args.device,
                              args.resume, args.stop_after)
            if folder:
                print(f"Pre-trained model written to {folder}")
        else:
            from hybridmim.evaluation import evaluate
            from hybridmim.inference import Segmenter

            from .datalist import read_datalist
            from .report import write_report

            cases = [c for c in read_datalist(args.dataset) if c.label and (not args.cases or c.name in args.cases)]
            report = evaluate(Segmenter(args.model, args.device), cases)
            write_report(report, args.output)
            print(json.dumps(report["dice_mean"]))
    except HybridMIMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def dataset_plan(dataset: Path, config: Path | None, network: str) -> dict:
    """The plan supervised training makes: with a config, from its training split and its card's network, exactly
    as ``supervised`` does; without one, for ``network`` from all of the dataset's labelled cases."""
    from hybridmim.planning import fingerprint, plan_for_network

    from .config import SupervisedConfig
    from .datalist import read_datalist, split_cases
    from .supervised import training_plan

    if config is not None:
        run = SupervisedConfig.from_dict(read_config(config))
        if not run.planned:
            raise HybridMIMError(f"{config} gives its own patch_size: training uses the card's spacing and patch, "
                                 "no plan is made")
        cases, _ = split_cases(read_datalist(dataset), run.validation_fraction, run.settings.seed, run.group_pattern)
        architecture = run.card.get("architecture") or {"name": "unet"}
        result = training_plan(run, cases)
    else:
        cases = [c for c in read_datalist(dataset) if c.label]
        architecture = {"name": network}
        if not cases:
            raise HybridMIMError(f"{dataset} lists no labelled cases")
        result = plan_for_network(fingerprint(cases), architecture)
    card = result.apply({"architecture": architecture})
    return {key: card[key] for key in ("target_spacing", "patch_size", "architecture", "intensity")} | \
        result.record()


if __name__ == "__main__":
    sys.exit(main())
