"""Supervised training from an MSD-style ``dataset.json`` into a model folder the engine loads.

The held-out validation cases are never trained on; the card's metrics are measured on them with the engine's
own inference path, on each case's original grid, and the split's case ids are written into the card.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch
from monai.losses import DiceCELoss
from tqdm import tqdm

from hybridmim.cases import load_case
from hybridmim.inference import Segmenter, select_device
from hybridmim.model_card import WEIGHTS_FILE, ModelCard
from hybridmim.model_store import LoadedModel, initialise_from, save_model
from hybridmim.networks import build_network

from .datalist import read_datalist, split_cases
from .evaluate import evaluate, write_report
from .sampling import PatchSampler

logger = logging.getLogger(__name__)

DEFAULT_TRAINING = {"steps": 2000, "batch_size": 2, "learning_rate": 2e-3, "weight_decay": 1e-5,
                    "warmup_steps": 100, "validation_fraction": 0.2, "seed": 0, "flip_axes": [],
                    "foreground_probability": 0.33, "rotation_degrees": 0.0, "scale_range": [1.0, 1.0],
                    "spatial_probability": 0.0}


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def train_supervised(config: dict[str, Any], dataset_json: Path, output: Path, device: str = "auto",
                     log_dir: Path | None = None, steps: int | None = None, init: str | None = None) -> Path:
    """Train, evaluate on the held-out split, write the model folder. ``init``: a model folder or id (e.g.
    HybridMIM-pretrained) whose encoder and decoder start the network; its head is made anew."""
    settings = {**DEFAULT_TRAINING, **config.get("training", {})}
    if steps is not None:
        settings["steps"] = steps
    card = ModelCard.from_dict({**config["card"], "weights": {"file": WEIGHTS_FILE, "sha256": ""}})
    torch.manual_seed(settings["seed"])
    target = select_device(device)

    train_paths, validation_paths = split_cases(read_datalist(dataset_json), settings["validation_fraction"],
                                                settings["seed"])
    logger.info("%d training cases, %d validation cases", len(train_paths), len(validation_paths))
    cases = [load_case(card, c.image, c.label, c.name) for c in tqdm(train_paths, desc="loading", leave=False)]
    sampler = PatchSampler(cases, card.patch_size, settings["seed"], settings["flip_axes"],
                           settings["foreground_probability"], rotation_degrees=settings["rotation_degrees"],
                           scale_range=settings["scale_range"], spatial_probability=settings["spatial_probability"])

    network = build_network(card.architecture["name"], card.in_channels, card.out_channels,
                            **card.architecture.get("args", {}))
    if init:
        init_card, fresh = initialise_from(network, init, card.architecture)
        card.training = {**card.training, "initialisation": f"{init_card.id} {init_card.version} "
                         f"(sha256 {init_card.weights['sha256'][:12]}...); fresh: {', '.join(fresh)}"}
        logger.info("initialised from %s; fresh: %s", init, fresh)
    network.to(target)
    optimizer = torch.optim.AdamW(network.parameters(), lr=settings["learning_rate"],
                                  weight_decay=settings["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(settings["warmup_steps"],
                                                                           settings["steps"]))
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=target.type == "cuda")

    log = open(Path(log_dir) / "train_log.jsonl", "a", encoding="utf-8") if log_dir else None  # noqa: SIM115
    started = time.time()
    network.train()
    bar = tqdm(range(settings["steps"]), desc=f"training {card.id}")
    for step in bar:
        images, labels = sampler.batch(settings["batch_size"])
        with autocast:
            loss = loss_function(network(images.to(target)), labels.to(target))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if log and step % 10 == 0:
            log.write(json.dumps({"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]}) + "\n")
            log.flush()
    elapsed = time.time() - started
    network.eval()

    segmenter = Segmenter(LoadedModel(output, card, network), device=target.type)
    report = evaluate(segmenter, validation_paths)
    if log_dir:
        write_report(report, Path(log_dir))
    card.training = {
        **card.training,
        "steps": settings["steps"], "settings": settings,
        "train_cases": len(train_paths), "time_seconds": round(elapsed),
        "hardware": torch.cuda.get_device_name() if target.type == "cuda" else
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
    }
    card.metrics = {
        "split": f"validation: {len(validation_paths)} cases held out from training (seed {settings['seed']})",
        "validation_cases": [c.name for c in validation_paths],
        "dice": report["dice_mean"],
    }
    return save_model(output, network.cpu(), card)
