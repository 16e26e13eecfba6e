"""Fine-tune a model on a user's few corrected volumes (plus unlabelled ones) into a new version of it.

The starting model may be bundled, pre-trained only, or an earlier fine-tune. Its preprocessing (spacing,
intensity, patch) is kept for its own structures. A new label set is allowed: the output layer is then re-made,
spacing, patch and pooling are planned from the user's volumes (planning.py), and the result gets its own id.
The result is written atomically to the user models folder and becomes the active version of its id; nothing is
written when the run fails or is cancelled, and the starting folder is only ever read.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from .cases import ImageSource, LabeledVolume, load_case, source_name
from .errors import HybridMIMError
from .evaluation import evaluate
from .finetune_plan import FineTunePlan, plan_fine_tune
from .inference import Segmenter, select_device
from .model_card import WEIGHTS_FILE, ModelCard
from .model_store import LoadedModel, check_user_models_dir, load_matching, read_weights, save_new_version
from .networks import build_network, output_layer_names
from .partial import UNREVIEWED
from .planning import can_plan, fingerprint, plan_for_network
from .postprocessing import single_piece_labels
from .progress import CancelToken
from .settings import TrainSettings
from .trainer import Checkpoint, TrainProgress, train_network

logger = logging.getLogger(__name__)

def fine_tune(model: str | Path, labeled: Sequence[tuple[ImageSource, ImageSource]],
              unlabeled: Sequence[ImageSource] = (), settings: TrainSettings | None = None, *,
              validation: Sequence[tuple[ImageSource, ImageSource]] = (), label_names: Sequence[str] | None = None,
              model_id: str | None = None, device: str = "auto",
              progress: Callable[[TrainProgress], None] | None = None, cancel: CancelToken | None = None,
              status: Callable[[str], None] = logger.info, checkpoint: Checkpoint | None = None,
              before_saving: Callable[[], None] | None = None) -> Path:
    """Fine-tune ``model`` (id or folder) on ``labeled`` (image, label map) pairs and ``unlabeled`` images: the
    plan (``plan_fine_tune``), then the run (``run_fine_tune``). Returns the new model folder (already the active
    version of its id)."""
    plan = plan_fine_tune(model, len(labeled), len(unlabeled), settings, label_names, model_id)
    return run_fine_tune(plan, labeled, unlabeled, validation=validation, device=device, progress=progress,
                         cancel=cancel, status=status, checkpoint=checkpoint, before_saving=before_saving)


def plan_new_structure(card: ModelCard, volumes: Sequence[LabeledVolume]) -> tuple[ModelCard, dict | None]:
    """``card`` with target spacing, patch and (UNet) pooling planned from the user's volumes, at the starting
    model's patch cost (voxels), and the plan's record; the network and its normalisation are kept, since the
    starting weights learned with them. A network whose pooling is not known keeps the parent's preprocessing."""
    if not can_plan(card.architecture["name"]):
        return card, None
    data_plan = plan_for_network(fingerprint(volumes, card.modality), card.architecture,
                                 math.prod(card.patch_size), asdict(card.intensity))
    planned = ModelCard.from_dict(data_plan.apply(card.to_dict(), replace=True), source=f"the plan for '{card.id}'")
    return planned, data_plan.record()


def run_fine_tune(plan: FineTunePlan, labeled: Sequence[tuple[ImageSource, ImageSource]],
                  unlabeled: Sequence[ImageSource] = (), *, validation: Sequence[tuple[ImageSource, ImageSource]] = (),
                  device: str = "auto", progress: Callable[[TrainProgress], None] | None = None,
                  cancel: CancelToken | None = None, status: Callable[[str], None] = logger.info,
                  checkpoint: Checkpoint | None = None, before_saving: Callable[[], None] | None = None) -> Path:
    """Carry out ``plan`` on these volumes (as many as it was made for).

    Label maps use 0 for background and the model's label values (or 1..N for a new label set); a partly corrected
    volume holds ``UNREVIEWED`` where the user did not review it (``hybridmim.partial``). ``validation``
    pairs are never trained on; their Dice is reported during training and written to the card. ``checkpoint``:
    where training keeps its state, to resume an interrupted run (same inputs and settings). ``before_saving`` is
    called once training and evaluation are done, before the model is written and made active (the command line
    tool stops honouring SIGTERM there, so the two are never left half-done). Returns the new model folder.
    """
    if (len(labeled), len(unlabeled)) != (plan.labeled, plan.unlabeled):
        raise HybridMIMError(f"The plan was made for {plan.labeled} labelled and {plan.unlabeled} unlabelled "
                             f"volumes, not {len(labeled)} and {len(unlabeled)}")
    check_user_models_dir()
    parent_folder, parent, state = read_weights(plan.parent_folder)
    card = ModelCard.from_dict(plan.card.to_dict(), source=f"the fine-tuned model '{plan.card.id}'")  # a copy
    remake_head, settings = plan.remake_head, plan.settings
    target = select_device(device)
    data_plan = None
    if remake_head:  # a new structure: spacing, patch and pooling from the user's volumes, not the parent's
        volumes = [LabeledVolume(source_name(image, "labelled"), image, label) for image, label in labeled]
        volumes += [LabeledVolume(source_name(image, "unlabelled"), image) for image in unlabeled]
        card, data_plan = plan_new_structure(card, volumes)
        if data_plan:
            status("Planned from your volumes: " + "; ".join(data_plan["reasons"]))
    if checkpoint is not None:
        checkpoint = replace(checkpoint, model=card.layout())

    status(f"Loading {len(labeled)} labelled, {len(unlabeled)} unlabelled volumes")
    labeled_cases = [load_case(card, image, label, source_name(image, f"labelled-{i + 1}"), require_foreground=True,
                               partial=True) for i, (image, label) in enumerate(labeled)]
    unlabeled_cases = [load_case(card, image, None, source_name(image, f"unlabelled-{i + 1}"))
                       for i, image in enumerate(unlabeled)]
    label_arrays = [c.label for c in labeled_cases if c.label is not None]
    if len(label_arrays) != len(labeled_cases):
        raise HybridMIMError("Every labelled volume needs its label map")
    partly = [c.name for c, labels in zip(labeled_cases, label_arrays) if np.any(labels == UNREVIEWED)]
    if partly:
        status(f"Partly corrected ({', '.join(partly)}): learning from the reviewed slices; the rest is labelled by "
               "the averaged copy of the network once it is trained enough")
    card.inference["largest_component"] = single_piece_labels(
        [labels for labels in label_arrays if not np.any(labels == UNREVIEWED)], card.label_names())
    if card.largest_component_names():
        status("One piece in every corrected volume, so only its largest piece will be kept: "
               + ", ".join(card.largest_component_names()))
    validation_volumes = [LabeledVolume(source_name(image, f"validation-{i + 1}"), image, label)
                          for i, (image, label) in enumerate(validation)]
    validation_cases = [load_case(card, v.image, v.label, v.name, require_foreground=True)
                        for v in validation_volumes]

    architecture = card.architecture
    torch.manual_seed(settings.seed)  # a re-made output layer starts from the run's seed too
    network = build_network(architecture["name"], card.in_channels, card.out_channels, **architecture.get("args", {}))
    head = output_layer_names(architecture["name"], card.in_channels, card.out_channels,
                              **architecture.get("args", {}))
    fresh = load_matching(network, state, parent.id, head if remake_head else frozenset())
    before = None
    if validation_volumes and not remake_head:
        status("Measuring the starting model's Dice on the validation volumes")
        before = evaluate(Segmenter(parent_folder, device=target.type), validation_volumes, cancel)["dice_mean"]
    status(f"Fine-tuning {parent.id} {parent.version} with {settings.method} on {target.type}"
           + (f" (new output layer for {', '.join(card.label_names().values())})" if remake_head else ""))
    result = train_network(network, labeled_cases, unlabeled_cases, card.patch_size, settings, target,
                           validation_cases, progress, cancel, checkpoint, head if settings.head_only else None)

    if validation_volumes:
        status("Measuring Dice on the validation volumes")
        report = evaluate(Segmenter(LoadedModel(parent_folder, card, network), device=target.type),
                          validation_volumes, cancel)
        card.metrics = {"split": f"validation: {len(validation_volumes)} labelled volumes given by the user, "
                                 "not trained on", "validation_cases": [v.name for v in validation_volumes],
                        "dice": report["dice_mean"], "hd95_mm": report["hd95_mean_mm"]}
        if before is not None:
            card.metrics["starting_model_dice"] = before
    if cancel is not None:
        cancel.raise_if_cancelled()
    card.description = (f"{parent.description} Fine-tuned ({settings.method}) on {len(labeled)} labelled and "
                        f"{len(unlabeled)} unlabelled volumes of the user's.").strip()
    card.training = {
        "parent": {"id": parent.id, "version": parent.version, "sha256": parent.weights["sha256"]},
        "method": settings.method, "labeled_volumes": len(labeled), "unlabeled_volumes": len(unlabeled),
        "labeled_cases": [c.name for c in labeled_cases], "output_layer": "re-made" if remake_head else "kept",
        "fresh_weights": fresh, "steps": result.steps, "time_seconds": round(result.seconds, 1),
        "hardware": result.hardware, "settings": asdict(settings),
        **({"plan": data_plan} if data_plan else {}),
    }
    card.weights = {"file": WEIGHTS_FILE, "sha256": ""}
    if not all(torch.isfinite(t).all() for t in network.state_dict().values() if t.is_floating_point()):
        raise HybridMIMError("Training diverged (weights are not finite numbers): nothing was written; try a lower "
                             "learning rate")
    if before_saving is not None:
        before_saving()
    folder = save_new_version(network.cpu(), card, parent.version if card.id == parent.id else "1.0.0")
    status(f"New model version {card.id} {card.version} written to {folder}")
    return folder
