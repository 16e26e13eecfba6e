"""``hybridmim``: segment volumes and list models from the command line, without Slicer."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from tqdm import tqdm

from .errors import HybridMIMError
from .model_store import list_models

DEFAULT_MODEL = "hippocampus-cnn"


def _segment(args: argparse.Namespace) -> int:
    from .imageio import check_output_path, read_volume, write_labelmap
    from .inference import Segmenter
    from .preview import write_preview

    output = check_output_path(args.output, args.input)
    if args.preview and not str(args.preview).lower().endswith(".png"):
        raise HybridMIMError("--preview must name a .png file")
    volume = read_volume(args.input)
    segmenter = Segmenter(args.model, args.device)
    with tqdm(total=100, desc=f"{segmenter.card.id} on {segmenter.device}", unit="%",
              disable=args.quiet, bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}]") as bar:
        def progress(fraction: float, message: str) -> None:
            bar.n = round(100 * fraction, 1)
            bar.set_postfix_str(message, refresh=True)

        labelmap = segmenter.segment(volume, progress)
    written = write_labelmap(labelmap, output, segmenter.card.labels)
    print(f"Segmentation written to {written.resolve()}")
    if args.preview:
        preview = write_preview(volume, labelmap, segmenter.card.labels, args.preview)
        print(f"Preview written to {preview.resolve()}")
    return 0


def _models(args: argparse.Namespace) -> int:
    models = list_models()
    if args.json:
        print(json.dumps([{**m.card.to_dict(), "folder": str(m.path), "bundled": m.bundled} for m in models],
                         indent=2))
        return 0
    if not models:
        print("No models found.")
    for model in models:
        card = model.card
        dice = card.metrics.get("dice", {})
        print(f"{card.id} {card.version} ({'bundled' if model.bundled else 'user'}): {card.name}")
        print(f"  modality {card.modality}; structures: {', '.join(card.label_names().values())}")
        print(f"  network {card.architecture['name']}; patch {card.patch_size}; spacing {card.target_spacing}")
        if dice:
            print(f"  Dice {', '.join(f'{k} {v:.3f}' for k, v in dice.items())} ({card.metrics.get('split', '')})")
        print(f"  licence: {card.licence}")
        print(f"  {card.intended_use}")
        print(f"  folder: {model.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridmim", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    commands = parser.add_subparsers(dest="command", required=True)

    segment = commands.add_parser("segment", help="segment a volume (file or DICOM folder)")
    segment.add_argument("input", help="volume: NIfTI, NRRD, MHA, ... or a folder holding a DICOM series")
    segment.add_argument("-o", "--output", required=True,
                         help="output: .seg.nrrd (Slicer segmentation) or .nii.gz/.nii/.nrrd/.mha labelmap")
    segment.add_argument("--model", default=DEFAULT_MODEL, help=f"model id or folder (default {DEFAULT_MODEL})")
    segment.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    segment.add_argument("--preview", help="also write a PNG with a few slices and the overlay")
    segment.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    segment.set_defaults(run=_segment)

    models = commands.add_parser("models", help="list bundled and user models with their cards")
    models.add_argument("--json", action="store_true", help="print the full cards as JSON")
    models.set_defaults(run=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.run(args)
    except HybridMIMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted; nothing was written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
