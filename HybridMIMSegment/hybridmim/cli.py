"""``hybridmim``: segment volumes, fine-tune models on a few corrected volumes, list and revert model versions,
from the command line, without Slicer.

It is also the Slicer module's worker: ``--progress json`` turns progress, status, the result and any error into
one JSON object per line on stdout (``event``: progress, step, status, result, error, cancelled), so the module,
the command line and scripts share one entry point. SIGTERM is handled like Ctrl-C: nothing is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from .errors import HybridMIMError
from .methods import AUTOMATIC, METHOD_LABELS, METHOD_TOOLTIPS
from .model_store import DEFAULT_MODEL, active_versions, model_versions, scan_models, set_active_version
from .progress import PARENT_ENVIRONMENT
from .settings import CHECKPOINT_EVERY, DEFAULT_LEARNING_RATE, DEFAULT_MINUTES, DEFAULT_STEPS

if TYPE_CHECKING:
    from .cases import ImageSource


def emit(event: str, **fields) -> None:
    """One JSON record on stdout (``--progress json``), flushed at once: the reader polls the stream."""
    record = {"event": event, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                 for k, v in fields.items()}}
    print(json.dumps(record), flush=True)


def _say(args: argparse.Namespace) -> Callable[[str], None]:
    """Where messages for people go: stdout normally, stderr when stdout carries JSON records."""
    if args.progress == "json":
        return lambda message: print(message, file=sys.stderr, flush=True)
    return print


def _segment(args: argparse.Namespace) -> int:
    from .imageio import check_image_path, check_output_path, read_volume, write_image, write_labelmap
    from .inference import Segmenter
    from .preview import write_preview

    output = check_output_path(args.output, args.input)
    if args.preview:
        check_output_path(args.preview, args.input, suffixes=(".png",))
    if args.uncertainty_map:
        check_image_path(args.uncertainty_map, args.input)
        if Path(args.uncertainty_map).resolve() == Path(args.output).resolve():
            raise HybridMIMError("--uncertainty-map and --output name the same file")
    volume = read_volume(args.input, args.series)
    segmenter = Segmenter(args.model, args.device)
    say = _say(args)
    with tqdm(total=100, desc=f"{segmenter.card.id} on {segmenter.device}", unit="%",
              disable=args.progress != "bar", bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}]") as bar:
        def progress(fraction: float, message: str) -> None:
            if args.progress == "json":
                emit("progress", fraction=fraction, message=message)
            bar.n = round(100 * fraction, 1)
            bar.set_postfix_str(message, refresh=True)

        if args.uncertainty_map:
            labelmap, uncertainty, uncertainty_map = segmenter.segment_with_uncertainty(volume, progress)
        else:
            (labelmap, uncertainty), uncertainty_map = segmenter.segment_and_score(volume, progress), None
    written = write_labelmap(labelmap, output, segmenter.card.labels)
    say(f"Segmentation written to {written.resolve()}")
    map_path = write_image(uncertainty_map, args.uncertainty_map).resolve() if uncertainty_map is not None else None
    if map_path is not None:
        say(f"Uncertainty map (0 certain .. 1 guessing) written to {map_path}")
    say(f"Uncertainty {uncertainty:.3f} (0 certain .. 1 guessing, where a structure is likely): "
        "'hybridmim rank' orders volumes by it")
    preview = write_preview(volume, labelmap, segmenter.card.labels, args.preview) if args.preview else None
    if preview is not None:
        say(f"Preview written to {preview.resolve()}")
    if args.progress == "json":
        emit("result", output=str(written.resolve()), model=str(segmenter.model.folder),
             id=segmenter.card.id, version=segmenter.card.version, device=str(segmenter.device),
             uncertainty=uncertainty, **({"uncertainty_map": str(map_path)} if map_path else {}))
    return 0


def _part_progress(args: argparse.Namespace, index: int, count: int, name: str) -> Callable[[float, str], None]:
    """Progress of the ``index``-th of ``count`` volumes as a share of the whole run (``--progress json``)."""
    def progress(fraction: float, message: str) -> None:
        if args.progress == "json":
            emit("progress", fraction=(index + fraction) / count, message=f"{name}: {message}")

    return progress


def _rank(args: argparse.Namespace) -> int:
    """Segment each volume (nothing written) and list them most uncertain first: the one worth correcting next."""
    from .imageio import read_volume
    from .inference import Segmenter

    volumes = [(path, read_volume(path)) for path in args.volumes]  # every input checked before any work
    segmenter = Segmenter(args.model, args.device)
    scores = []
    with tqdm(volumes, desc=f"ranking with {segmenter.card.id}", unit="volume",
              disable=args.progress != "bar") as bar:
        for index, (path, volume) in enumerate(bar):
            scores.append((segmenter.segment_and_score(volume, _part_progress(args, index, len(volumes), path))[1],
                           path))
    ranking = sorted(scores, key=lambda item: -item[0])
    if args.progress == "json":
        emit("result", model=str(segmenter.model.folder), id=segmenter.card.id, version=segmenter.card.version,
             ranking=[{"volume": path, "uncertainty": score} for score, path in ranking])
    else:
        print(f"{'uncertainty':>11}  volume (most uncertain first; model {segmenter.card.id} "
              f"{segmenter.card.version})")
        for score, path in ranking:
            print(f"{score:11.3f}  {path}")
    return 0


def colon_fields(value: str) -> list[str]:
    """``value`` split at its colons, except a Windows drive's (``C:`` opening a field)."""
    fields, start = [], 0
    for match in re.finditer(":", value):
        if match.start() != start + 1:
            fields.append(value[start:match.start()])
            start = match.start() + 1
    return [*fields, value[start:]]


def image_label_pair(value: str) -> tuple[str, str]:
    """``IMAGE:LABEL``."""
    fields = colon_fields(value)
    if len(fields) != 2 or not all(fields):
        raise argparse.ArgumentTypeError(f"'{value}' is not IMAGE:LABEL")
    return fields[0], fields[1]


def labeled_volume(value: str) -> tuple[str, ...]:
    """``IMAGE:LABEL`` or ``IMAGE:LABEL:SEGMENTATION`` (a partly corrected volume: the model's segmentation the
    label map was corrected from)."""
    fields = colon_fields(value)
    if len(fields) not in (2, 3) or not all(fields):
        raise argparse.ArgumentTypeError(f"'{value}' is not IMAGE:LABEL or IMAGE:LABEL:SEGMENTATION")
    return tuple(fields)


def reviewed_pairs(labeled: list[tuple[str, ...]], say: Callable[[str], None]) -> list[tuple[str, ImageSource]]:
    """(image, label) pairs; a partly corrected volume's label keeps only the slices edited from its segmentation
    (``hybridmim.partial``)."""
    from .imageio import read_volume
    from .partial import partly_reviewed

    pairs: list[tuple[str, ImageSource]] = []
    for image, label, *original in labeled:
        if not original:
            pairs.append((image, label))
            continue
        partial, reviewed, slices = partly_reviewed(read_volume(label), read_volume(original[0]), label)
        say(f"{label}: learning from the {reviewed} of {slices} slices edited from {original[0]}")
        pairs.append((image, partial))
    return pairs


def _finetune(args: argparse.Namespace) -> int:
    from .finetune import run_fine_tune
    from .finetune_plan import plan_fine_tune
    from .settings import settings_from
    from .trainer import Checkpoint

    if args.resume and not args.checkpoint_dir:
        raise HybridMIMError("--resume needs --checkpoint-dir: the checkpoint is kept there")

    rate = {} if args.learning_rate is None else {"learning_rate": args.learning_rate}
    settings = settings_from(args.method, args.steps, args.minutes, args.seed, len(args.labeled),
                             len(args.unlabeled), **rate)
    plan = plan_fine_tune(args.model, len(args.labeled), len(args.unlabeled), settings, args.labels, args.id)
    say = _say(args)
    labeled = reviewed_pairs(args.labeled, say)
    say(f"Using {len(args.labeled)} labelled, {len(args.unlabeled)} unlabelled and {len(args.validation)} "
        f"validation volumes; method {settings.method}")
    with tqdm(total=100, desc=f"fine-tuning {args.model} ({settings.method})", unit="%",
              disable=args.progress != "bar",
              bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}] {postfix}") as bar:
        def progress(report) -> None:
            if args.progress == "json":
                emit("step", step=report.step, fraction=report.fraction, seconds=report.seconds,
                     losses=report.losses, learning_rate=report.learning_rate,
                     validation_dice=report.validation_dice)
            bar.n = round(100 * report.fraction, 1)
            losses = " ".join(f"{k} {v:.3f}" for k, v in report.losses.items())
            dice = f" | validation Dice {report.validation_dice:.3f}" if report.validation_dice is not None else ""
            bar.set_postfix_str(f"step {report.step} | {losses}{dice}", refresh=report.step % 5 == 0 or bool(dice))

        def status(message: str) -> None:
            if args.progress == "json":
                emit("status", message=message)
            else:
                bar.write(message)

        checkpoint = Checkpoint(Path(args.checkpoint_dir) / "checkpoint.pt", resume=args.resume) \
            if args.checkpoint_dir else None
        folder = run_fine_tune(plan, labeled, args.unlabeled, validation=args.validation, device=args.device,
                               progress=progress, status=status, checkpoint=checkpoint,
                               before_saving=_ignore_termination)
    from .model_card import ModelCard

    card = ModelCard.load(folder)
    say(f"New model version {card.id} {card.version} ({card.training['steps']} steps, "
        f"{card.training['time_seconds']:.0f} s) in {folder}")
    if summary := card.validation_summary():
        say(summary)
    say(f"It is now the active version of '{card.id}'; 'hybridmim revert {card.id} VERSION' goes back.")
    if args.progress == "json":
        emit("result", folder=str(folder), id=card.id, version=card.version)
    return 0


def _versions(args: argparse.Namespace) -> int:
    versions = model_versions(args.id)
    if not versions:
        raise HybridMIMError(f"No model '{args.id}'")
    active = active_versions().get(args.id, versions[-1].card.version)
    for folder in versions:
        card = folder.card
        dice = card.metrics.get("dice", {}).get("mean")
        parent = card.training.get("parent")
        score = f"Dice {dice:.3f}" if dice is not None else "Dice -    "
        origin = f"from {parent['id']} {parent['version']}" if parent else ""
        print(f"{'*' if card.version == active else ' '} {card.version:16s} "
              f"{'bundled' if folder.bundled else 'user':7s} {score}  {origin}  {folder.path}")
    return 0


def _revert(args: argparse.Namespace) -> int:
    folder = set_active_version(args.id, args.version)
    print(f"'{args.id}' now means version {args.version} ({folder.path})")
    return 0


def _devices(args: argparse.Namespace) -> int:
    from .inference import available_devices

    devices = available_devices()
    if args.progress == "json":
        emit("result", devices=devices)
    else:
        print(json.dumps(devices) if args.json else "\n".join(devices))
    return 0


def _figures(values: object, digits: int) -> str:
    """``name value`` pairs of a card's metrics; anything that is not a number is left out."""
    if not isinstance(values, dict):
        return ""
    return ", ".join(f"{k} {v:.{digits}f}" for k, v in values.items()
                     if isinstance(v, int | float) and not isinstance(v, bool))


def _models(args: argparse.Namespace) -> int:
    models, skipped = scan_models()
    if args.json:
        print(json.dumps({"models": [{**m.card.to_dict(), "folder": str(m.path), "bundled": m.bundled}
                                     for m in models],
                          "skipped": [{"folder": str(path), "reason": reason} for path, reason in skipped]},
                         indent=2))
        return 0
    for path, reason in skipped:
        print(f"skipped: {path}: {reason}", file=sys.stderr)
    if not models:
        print("No models found.")
    for model in models:
        card = model.card
        dice, hd95 = _figures(card.metrics.get("dice"), 3), _figures(card.metrics.get("hd95_mm"), 2)
        print(f"{card.id} {card.version} ({'bundled' if model.bundled else 'user'}): {card.name}")
        if card.task == "pretrained":
            print(f"  pre-trained only (no segmentation head): fine-tune it first; modality {card.modality}")
        else:
            print(f"  modality {card.modality}; structures: {', '.join(card.label_names().values())}")
        print(f"  network {card.architecture['name']}; patch {card.patch_size}; spacing {card.target_spacing}")
        if dice:
            print(f"  Dice {dice} ({card.metrics.get('split', '')})")
        if hd95:
            print(f"  HD95 mm {hd95}")
        if card.largest_component_names():
            print(f"  keeps only the largest piece of: {', '.join(card.largest_component_names())}")
        if "initialisation" in card.training:
            print(f"  initialisation: {card.training['initialisation']}")
        print(f"  licence: {card.licence}")
        print(f"  {card.intended_use}")
        print(f"  folder: {model.path}")
    return 0


def _add_progress_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--progress", choices=["bar", "json", "none"], default="bar",
                         help="bar (default): a progress bar; json: one JSON record per line on stdout (progress, "
                              "result, error), as the Slicer module reads them; none: quiet")
    command.add_argument("-q", "--quiet", dest="progress", action="store_const", const="none",
                         help="no progress bar (same as --progress none)")


def build_parser() -> argparse.ArgumentParser:
    from .imageio import LABELMAP_SUFFIXES

    parser = argparse.ArgumentParser(prog="hybridmim", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    commands = parser.add_subparsers(dest="command", required=True)

    segment = commands.add_parser("segment", help="segment a volume (file or DICOM folder)")
    segment.add_argument("input", help="volume: NIfTI, NRRD, MHA, ... or a folder holding a DICOM series")
    segment.add_argument("--series", metavar="UID", help="which DICOM series, when the input folder holds several "
                                                         "(the error lists them)")
    segment.add_argument("-o", "--output", required=True,
                         help=f"output: {LABELMAP_SUFFIXES[0]} (Slicer segmentation) or a labelmap "
                              f"({', '.join(LABELMAP_SUFFIXES[1:])})")
    segment.add_argument("--model", default=DEFAULT_MODEL, help=f"model id or folder (default {DEFAULT_MODEL})")
    segment.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda or mps")
    segment.add_argument("--preview", help="also write a PNG with a few slices and the overlay")
    segment.add_argument("--uncertainty-map", metavar="PATH",
                         help="also write the model's uncertainty voxel by voxel (normalised entropy, 0 certain .. 1 "
                              "guessing; float32, the input's geometry): where to look when correcting")
    _add_progress_options(segment)
    segment.set_defaults(run=_segment)

    rank = commands.add_parser("rank", help="order volumes by the model's uncertainty: correct the first next",
                               description="Segment each volume (nothing is written) and list them most "
                               "uncertain first. Uncertainty: the mean normalised entropy of the model's class "
                               "probabilities where it finds a structure likely (0 certain, 1 guessing).")
    rank.add_argument("volumes", nargs="+", help="volumes (files or DICOM folders)")
    rank.add_argument("--model", default=DEFAULT_MODEL, help=f"model id or folder (default {DEFAULT_MODEL})")
    rank.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda or mps")
    _add_progress_options(rank)
    rank.set_defaults(run=_rank)

    tune = commands.add_parser(
        "finetune", help="fine-tune a model on a few labelled volumes (+ unlabelled ones) into a new version",
        description="Fine-tune a model on 1-20 labelled volumes (IMAGE:LABEL; label values 0 = background, "
                    "1..N = the model's structures or the --labels given) plus unlabelled volumes. The result is "
                    "a new version in the user models folder, made active; bundled models are never changed.")
    tune.add_argument("--model", default=DEFAULT_MODEL, help=f"starting model id or folder (default {DEFAULT_MODEL})")
    tune.add_argument("--labeled", nargs="+", action="extend", required=True, type=labeled_volume,
                      metavar="IMAGE:LABEL[:SEGMENTATION]",
                      help="labelled volumes (the option may be repeated: they add up). With SEGMENTATION, the "
                           "model's segmentation LABEL was corrected from: only the slices that differ from it "
                           "are learned from, the rest is treated as unlabelled")
    tune.add_argument("--unlabeled", nargs="*", action="extend", default=[], metavar="IMAGE",
                      help="unlabelled volumes (may be repeated)")
    tune.add_argument("--validation", nargs="*", action="extend", default=[], type=image_label_pair,
                      metavar="IMAGE:LABEL",
                      help="held-out labelled volumes: Dice during training and on the card (never trained on; "
                           "may be repeated)")
    tune.add_argument("--method", default=AUTOMATIC, choices=list(METHOD_LABELS),
                      help="; ".join(f"{name}: {tip.rstrip('.')}" for name, tip in METHOD_TOOLTIPS.items())
                      + " (default: auto)")
    tune.add_argument("--minutes", type=float,
                      help=f"time budget (with --steps: whichever comes first; neither given: {DEFAULT_MINUTES:g} "
                           f"minutes or {DEFAULT_STEPS} steps)")
    tune.add_argument("--steps", type=int, help="step budget")
    tune.add_argument("--labels", nargs="+", action="extend", metavar="NAME",
                      help="structure names for label values 1..N when they differ from the model's (the output "
                           "layer is re-made and the result gets a new id); a name starting with '-' is given "
                           "as --labels=NAME")
    tune.add_argument("--id", help="id of the result (default: the model's, or '<model>-<labels>' for new labels)")
    tune.add_argument("--learning-rate", type=float, metavar="LR",
                      help=f"peak learning rate (default {DEFAULT_LEARNING_RATE:g}); lower, e.g. 1e-4, changes a "
                           "model of the same structures less (docs/fine-tuning.md)")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--checkpoint-dir", metavar="DIR",
                      help=f"keep a checkpoint of the run here (every {CHECKPOINT_EVERY} steps), to resume it after an "
                           "interruption")
    tune.add_argument("--resume", action="store_true",
                      help="continue from the checkpoint in --checkpoint-dir (same volumes and settings)")
    tune.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda or mps")
    _add_progress_options(tune)
    tune.set_defaults(run=_finetune)

    versions = commands.add_parser("versions", help="list the versions of a model (* = active)")
    versions.add_argument("id", help="model id")
    versions.set_defaults(run=_versions)

    revert = commands.add_parser("revert", help="make an earlier (or any) version of a model the active one")
    revert.add_argument("id", help="model id")
    revert.add_argument("version", help="version to use, as listed by 'hybridmim versions ID'")
    revert.set_defaults(run=_revert)

    models = commands.add_parser("models", help="list bundled and user models with their cards")
    models.add_argument("--json", action="store_true", help="print the full cards as JSON")
    models.set_defaults(run=_models)

    devices = commands.add_parser("devices", help="list the devices PyTorch can use here, best first")
    devices.add_argument("--json", action="store_true", help="print them as a JSON list")
    _add_progress_options(devices)
    devices.set_defaults(run=_devices)
    return parser


def _interrupt(signum, frame) -> None:
    """SIGTERM (the Slicer module's Cancel, ``kill``) unwinds like Ctrl-C: staging folders are removed."""
    raise KeyboardInterrupt


def _ignore_termination() -> None:
    """From here on the run completes: a model being written and made active is not left half-way, and the
    result record that follows tells the caller it exists."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _stop_with_parent() -> None:
    """As the Slicer module's worker: stop (as on Cancel) when the Slicer process is gone (POSIX)."""
    parent = os.environ.get(PARENT_ENVIRONMENT, "")
    if os.name != "posix" or not parent.isdigit():
        return

    def watch() -> None:
        while True:
            time.sleep(2.0)
            try:
                os.kill(int(parent), 0)
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            except PermissionError:  # alive, another user's: not ours to judge
                continue

    threading.Thread(target=watch, name="parent watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    json_records = getattr(args, "progress", None) == "json"
    previous = signal.signal(signal.SIGTERM, _interrupt)
    _stop_with_parent()
    try:
        return args.run(args)
    except HybridMIMError as error:
        if json_records:
            emit("error", kind=type(error).__name__, message=str(error))
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if json_records:
            emit("cancelled", message="Interrupted; nothing was written.")
        print("Interrupted; nothing was written.", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
