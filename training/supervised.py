"""Supervised training from an MSD-style ``dataset.json`` into a model folder the engine loads.

The held-out validation cases are never trained on; the card's metrics are measured on them with the engine's
own inference path, on each case's original grid, and the split's case ids are written into the card.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from hybridmim.cases import LabeledVolume, load_case
from hybridmim.evaluation import evaluate
from hybridmim.inference import Segmenter, select_device
from hybridmim.model_card import WEIGHTS_FILE, ModelCard
from hybridmim.model_store import LoadedModel, initialise_from, save_model
from hybridmim.networks import build_network
from hybridmim.planning import Plan, fingerprint, plan_for_network
from hybridmim.postprocessing import single_piece_labels
from hybridmim.trainer import Checkpoint, TrainProgress, train_network

from .config import SupervisedConfig
from .datalist import read_datalist, split_cases
from .report import write_report

logger = logging.getLogger(__name__)

HALF_DICE_TOLERANCE = 0.001
CHECKPOINT = "checkpoint.pt"


def train_supervised(config: dict[str, Any], dataset_json: Path, output: Path, device: str = "auto",
                     log_dir: Path | None = None, steps: int | None = None, init: str | None = None,
                     resume: bool = False) -> Path:
    """Train, evaluate on the held-out split, write the model folder. ``config``: the JSON of a supervised
    training config (``hybridmim_training.config``), checked before any work. ``init``: a model folder or id (e.g.
    HybridMIM-pretrained) whose encoder and decoder start the network; its head is made anew. With ``log_dir`` a
    checkpoint is kept there; ``resume`` continues from it."""
    run = SupervisedConfig.from_dict(config).with_steps(steps)
    train_settings = run.settings
    target = select_device(device)

    train_volumes, validation_volumes = split_cases(read_datalist(dataset_json), run.validation_fraction,
                                                train_settings.seed, run.group_pattern)
    logger.info("%d training cases, %d validation cases", len(train_volumes), len(validation_volumes))
    card_fields = run.card
    if run.planned:  # from the training cases (never the validation ones)
        card_fields = training_plan(run, train_volumes).apply(card_fields)
        logger.info("plan: %s", "; ".join(card_fields["training"]["plan"]["reasons"]))
    card = ModelCard.from_dict({**card_fields, "weights": {"file": WEIGHTS_FILE, "sha256": ""}})
    cases = [load_case(card, c.image, c.label, c.name) for c in tqdm(train_volumes, desc="loading", leave=False)]
    if "largest_component" not in card.inference:  # a config may set it; else the training labels decide
        card.inference["largest_component"] = single_piece_labels([c.label for c in cases], card.label_names())
    logger.info("keeping only the largest piece of label(s) %s", card.inference["largest_component"])

    network = build_network(card.architecture["name"], card.in_channels, card.out_channels,
                            **card.architecture.get("args", {}))
    if init:
        init_card, fresh = initialise_from(network, init, card.architecture)
        card.training = {**card.training, "initialisation": f"{init_card.id} {init_card.version} "
                         f"(sha256 {init_card.weights['sha256'][:12]}...); fresh: {', '.join(fresh) or 'none'}"}
        logger.info("initialised from %s; fresh: %s", init, fresh)

    log = open(Path(log_dir) / "train_log.jsonl", "a", encoding="utf-8") if log_dir else None  # noqa: SIM115
    bar = tqdm(total=train_settings.steps, desc=f"training {card.id}")

    def report_step(progress: TrainProgress) -> None:
        loss = sum(progress.losses.values())
        bar.update(progress.step - bar.n)  # a resumed run starts past 0
        bar.set_postfix(loss=f"{loss:.4f}")
        if log and progress.step % 10 == 0:
            log.write(json.dumps({"step": progress.step, "loss": loss, "lr": progress.learning_rate}) + "\n")
            log.flush()

    checkpoint = Checkpoint(Path(log_dir) / CHECKPOINT, run.checkpoint_every, resume, card.layout()) \
        if log_dir else None
    result = train_network(network, cases, [], card.patch_size, train_settings, target, progress=report_step,
                           checkpoint=checkpoint)
    bar.close()
    if log:
        log.close()

    report = evaluate(Segmenter(LoadedModel(output, card, network), device=target.type), validation_volumes)
    if log_dir:
        write_report(report, Path(log_dir))
    card.training = {
        **card.training,
        "steps": result.steps, "settings": run.recorded_settings(),
        "train_cases": len(train_volumes), "time_seconds": round(result.seconds), "hardware": result.hardware,
    }
    card.metrics = {
        "split": f"validation: {len(validation_volumes)} cases held out from training (seed {train_settings.seed})",
        "validation_cases": [c.name for c in validation_volumes],
        "dice": report["dice_mean"], "hd95_mm": report["hd95_mean_mm"],
        "per_case": "evaluation.csv of the training run (Dice and HD95 per validation case)",
    }
    if run.storage == "float16":
        return _save_half_if_dice_unchanged(output, network.cpu(), card, report, validation_volumes, target)
    return save_model(output, network.cpu(), card)


def training_plan(run: SupervisedConfig, train_volumes: list[LabeledVolume]) -> Plan:
    """The plan a config without spacing and patch gets, from its training cases and its card's network."""
    architecture = run.card.get("architecture") or {"name": "unet"}
    return plan_for_network(fingerprint(train_volumes, run.card.get("modality")), architecture)


def _save_half_if_dice_unchanged(output: Path, network, card: ModelCard, report: dict, validation_volumes,
                                 target) -> Path:
    """Store the weights as fp16 (half the download) only when the validation Dice of the stored weights matches
    the fp32 network's to 0.001 per structure; otherwise keep fp32. The card says which, with both figures."""
    with tempfile.TemporaryDirectory(prefix="fp16-trial-") as trial:  # never at ``output``: a kill leaves nothing
        folder = save_model(Path(trial) / output.name, network, card, half=True)
        half_report = evaluate(Segmenter(folder, device=target.type), validation_volumes)
    worst = max(abs(half_report["dice_mean"][k] - v) for k, v in report["dice_mean"].items())
    card.training["storage"] = {"float32_dice": report["dice_mean"], "float16_dice": half_report["dice_mean"],
                                "largest_difference": round(worst, 5)}
    if worst > HALF_DICE_TOLERANCE:
        logger.warning("fp16 weights change validation Dice by %.4f: storing fp32", worst)
        return save_model(output, network, card)
    card.metrics.update(dice=half_report["dice_mean"], hd95_mm=half_report["hd95_mean_mm"])  # of what ships
    return save_model(output, network, card, half=True)
