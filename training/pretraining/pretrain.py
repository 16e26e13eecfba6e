"""The HybridMIM pre-training loop: one process on CPU or GPU, or many with ``torchrun`` (DDP). Checkpoints are
written atomically every N steps and ``resume`` continues exactly (model, optimiser, scheduler, step; the data and
the random masks/dropout of every step are derived from the seed, the rank and the step)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from hybridmim.cases import LabeledVolume
from hybridmim.model_card import WEIGHTS_FILE, ModelCard
from hybridmim.model_store import save_model
from hybridmim.preprocessing import HU_WINDOW
from hybridmim.trainer import hardware_name, warmup_cosine

from ..config import PretrainConfig, PretrainData, PretrainSettings
from ..datalist import seeded_split
from .data import StepCrops, cached_volume, sources_from_datalist, sources_from_folder
from .losses import consistency_loss, count_loss, location_loss, masked_reconstruction_loss, nt_xent_loss
from .masking import (
    apply_mask,
    patch_validity,
    random_corner,
    random_patch_mask,
    region_slices,
    subvolume_bits,
    subvolume_targets,
    voxel_mask,
)
from .pretext import GRID, HybridMIMModel

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


def collect_sources(data: PretrainData) -> list[LabeledVolume]:
    sources = [s for path in data.datalists for s in sources_from_datalist(Path(path))]
    sources += [s for path, modality in data.folders for s in sources_from_folder(Path(path), modality)]
    if not sources:
        raise ValueError("No pre-training volumes: give datalists and/or folders")
    return sources


def pretext_losses(model, module: HybridMIMModel, crops: torch.Tensor, valid: torch.Tensor,
                   settings: PretrainSettings, generator: torch.Generator, device: torch.device,
                   gather: bool = True) -> dict[str, torch.Tensor]:
    """All five HybridMIM losses and their weighted total for one batch of crops and their validity masks.
    ``model`` is the (possibly DDP wrapped) ``module``; ``gather=False`` for work on one rank only (no collective
    operations). Padding is never masked and never a target."""
    patches_valid = patch_validity(valid, module.mask_patch)
    patch_mask = random_patch_mask(crops.shape[0], GRID, settings.mask_ratio, generator, patches_valid)
    mask = voxel_mask(patch_mask, module.mask_patch).to(device)
    crops, valid = crops.to(device), valid.to(device)
    masked = apply_mask(crops, mask)
    corner = random_corner(generator) if settings.region == "random" else (0, 0, 0)
    output = model(masked, corner)
    with torch.no_grad():  # second pass with other dropout: the positive of each sample
        positives = module.embed(masked)
    region = (..., *region_slices(corner, module.subvolume))
    counts, bits = subvolume_targets(patch_mask)
    bit_weights = subvolume_bits(patches_valid).float().to(device)
    count_weights = (bit_weights.sum(-1) > 0).float()
    losses = {
        "reconstruction": masked_reconstruction_loss(output.reconstruction, crops[region],
                                                     mask[region] * valid[region]),
        "count": count_loss(output.count_logits, counts.to(device), count_weights),
        "location": location_loss(output.location_logits, bits.to(device), bit_weights),
        "consistency": consistency_loss(output.count_logits, output.location_logits, bit_weights),
        "contrastive": nt_xent_loss(output.embedding, positives, settings.temperature, gather),
    }
    weights = dataclasses.asdict(settings.loss_weights)
    losses["total"] = sum(weights[name] * losses[name] for name in weights)
    return losses


def _setup_distributed(device: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _save_checkpoint(path: Path, step: int, module, optimizer, scheduler, seconds: float) -> None:
    staging = path.with_name(path.name + ".partial")
    torch.save({"step": step, "model": module.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "seconds": seconds}, staging)
    os.replace(staging, path)


def pretrain(config: dict[str, Any], output: Path, device: str = "auto", resume: bool = False,
             stop_after: int | None = None) -> Path | None:
    """Pre-train, export ``output/model`` when all steps are done, and return its folder (None if stopped early
    or on ranks other than 0). ``stop_after`` ends this run after that many steps (a later ``resume`` goes on)."""
    run = PretrainConfig.from_dict(config)
    settings = run.settings
    rank, world, target = _setup_distributed(device)
    output = Path(output)
    checkpoint_path = output / CHECKPOINT

    train_sources, validation_sources = seeded_split(collect_sources(run.data), lambda s: s.name,
                                                     run.data.validation_fraction, settings.seed)
    spacing = run.card.get("target_spacing")
    cache = Path(settings.cache_dir) if settings.cache_dir else output / "cache"
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        for source in tqdm(train_sources + validation_sources, desc="caching volumes", leave=False):
            cached_volume(source, spacing, cache)
    if world > 1:
        dist.barrier()
    train_cached = [cached_volume(s, spacing, cache) for s in train_sources]
    validation_cached = [cached_volume(s, spacing, cache) for s in validation_sources]

    torch.manual_seed(settings.seed)
    architecture = run.card["architecture"]
    module = HybridMIMModel(architecture["name"], architecture.get("args", {}), settings.mask_patch).to(target)
    model = DistributedDataParallel(module) if world > 1 else module
    optimizer = torch.optim.AdamW(module.parameters(), lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(settings.warmup_steps,
                                                                           settings.steps))
    step, seconds_before = 0, 0.0  # seconds of training in earlier (interrupted) runs
    if resume and checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=target, weights_only=True)
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, seconds_before = int(state["step"]), float(state.get("seconds", 0.0))
        logger.info("resumed at step %d", step)

    crops = StepCrops(train_cached, module.crop_size, settings.volumes_per_step, settings.crops_per_volume,
                      settings.seed, rank, step, settings.steps)
    loader = DataLoader(crops, batch_size=None, num_workers=settings.workers,
                        pin_memory=target.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if target.type == "cuda" else nullcontext()
    writer = _tensorboard(output) if rank == 0 else None
    log = open(output / "log.jsonl", "a", encoding="utf-8") if rank == 0 else None  # noqa: SIM115
    last = settings.steps if stop_after is None else min(settings.steps, step + stop_after)
    bar = tqdm(total=last - step, desc=f"HybridMIM {module.architecture}", disable=rank != 0)
    module.train()
    started = time.time()
    for batch, valid in loader:
        if step >= last:
            break
        step_seed = settings.seed * 1_000_003 + rank * 7919 + step
        torch.manual_seed(step_seed)  # dropout of this step: identical after a resume
        generator = torch.Generator().manual_seed(step_seed + 1)
        with autocast:
            losses = pretext_losses(model, module, batch, valid, settings, generator, target)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        scheduler.step()
        step += 1
        bar.update(1)
        if rank == 0 and (step % settings.log_every == 0 or step == last):
            values = {name: float(value.detach()) for name, value in losses.items()}
            bar.set_postfix(loss=f"{values['total']:.4f}")
            log.write(json.dumps({"step": step, **values, "lr": scheduler.get_last_lr()[0]}) + "\n")
            log.flush()
            if writer:
                for name, value in values.items():
                    writer.add_scalar(f"train/{name}", value, step)
        if rank == 0 and validation_cached and (step % settings.validate_every == 0 or step == settings.steps):
            _validate(module, validation_cached, settings, target, step, writer, log)
        if rank == 0 and (step % settings.save_every == 0 or step == last):
            _save_checkpoint(checkpoint_path, step, module, optimizer, scheduler,
                             seconds_before + time.time() - started)
        snapshot = output / "snapshots" / f"step-{step:06d}"
        if rank == 0 and settings.snapshots and log_spaced(step) and step < settings.steps \
                and not snapshot.exists():  # a resumed run passing it again: the same weights (exact resume)
            export(module, run, train_sources, len(validation_sources), snapshot,
                   seconds_before + time.time() - started, output, step)
    bar.close()
    if rank == 0:
        log.close()
        if writer:
            writer.close()
    if world > 1:
        dist.barrier()
    if rank != 0 or step < settings.steps:
        return None
    return export(module, run, train_sources, len(validation_sources), output / "model",
                  seconds_before + time.time() - started, output)


def _validate(module, cached, settings, target, step, writer, log) -> None:
    """Losses on held-out volumes with fixed crops and masks, so the curve is comparable across steps (volumes
    drawn with replacement: one held-out volume still gives a batch). Runs on rank 0 alone, so it uses the bare
    module and no collective operation."""
    crops, valid = StepCrops(cached, module.crop_size, settings.volumes_per_step, settings.crops_per_volume,
                             settings.seed + 1, 0, 0, 1)[0]
    module.eval()  # normalisation statistics as learnt, untouched by validation crops ...
    for layer in module.modules():
        if isinstance(layer, (torch.nn.Dropout, torch.nn.Dropout2d, torch.nn.Dropout3d)):
            layer.train()  # ... but dropout on: the contrastive positives are two dropout passes
    with torch.no_grad():
        losses = pretext_losses(module, module, crops, valid, settings,
                                torch.Generator().manual_seed(settings.seed), target, gather=False)
    module.train()
    values = {f"validation_{name}": float(value) for name, value in losses.items()}
    log.write(json.dumps({"step": step, **values}) + "\n")
    if writer:
        for name, value in values.items():
            writer.add_scalar(name.replace("validation_", "validation/"), value, step)


def _tensorboard(output: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.warning("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
        return None
    return SummaryWriter(str(output / "tensorboard"))


def log_spaced(step: int) -> bool:
    """Steps 100, 200, 500, 1000, 2000, 5000, ...: where snapshots are exported, to measure what longer
    pre-training buys downstream."""
    digits = str(step)
    return step >= 100 and digits[0] in "125" and set(digits[1:]) == {"0"}


def export(module: HybridMIMModel, run: PretrainConfig, sources: list[LabeledVolume], held_out: int, folder: Path,
           seconds: float, output: Path, steps: int | None = None) -> Path:
    """Encoder + decoder as an engine model folder; the pretext heads and the reconstruction output are dropped.
    The config's card gives the id, names, licence and, optionally, the fine-tuning patch (default: the crop) and
    inference settings that fine-tunes inherit; the run fills in the rest. ``steps``: those done when this is a
    snapshot of an unfinished run."""
    losses = [json.loads(line) for line in (output / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    final = next((entry for entry in reversed(losses) if "total" in entry), {})
    modalities = sorted({s.modality or "MRI" for s in sources})
    template = run.card
    card = ModelCard.from_dict({
        "version": "1.0.0", "name": template.get("id"), "patch_size": [module.crop_size] * 3,
        "description": "HybridMIM-pretrained encoder and decoder (no segmentation head).",
        "licence": "See the pre-training data's licences in 'training'.", **template,
        "modality": "+".join(modalities), "task": "pretrained", "labels": [],
        "intensity": {"method": "auto", "window": list(HU_WINDOW), "percentiles": [0.5, 99.5]},
        "weights": {"file": WEIGHTS_FILE, "sha256": ""},
        "training": {"method": "HybridMIM self-supervised pre-training", "steps": steps or run.settings.steps,
                     "hardware": f"{dist.get_world_size() if dist.is_initialized() else 1} x "
                                 f"{hardware_name(next(module.parameters()).device)}",
                     "command": "hybridmim-train pretrain --config <config>", **template.get("training", {}),
                     "volumes": len(sources), "validation_volumes": held_out, "modalities": modalities,
                     "settings": dataclasses.asdict(run.settings), "data": dataclasses.asdict(run.data),
                     "final_losses": final, "time_seconds": round(seconds),
                     "segmentation_head": "none (pretext heads and reconstruction output dropped)"},
    })
    return save_model(folder, module.backbone_state_without_head(), card)
