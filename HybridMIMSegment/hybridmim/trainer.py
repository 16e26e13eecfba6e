"""The one training loop, for every fine-tuning method (``hybridmim.methods``), budgeted by steps and/or minutes.

Offline training (``hybridmim_training``), ``hybridmim finetune`` and the Slicer Fine-tune button all run this
loop, on cases already on the model grid (``hybridmim.cases``).

Semi-supervised methods start with a supervised phase (``supervised_fraction`` of the budget: a new head
must first learn the structure before its predictions are worth using as pseudo-labels); the EMA teacher is
then copied from the student and updated every step, and each step's losses are the method's. Partly corrected
volumes (``hybridmim.partial``) get the teacher too, whatever the method: after the supervised phase it labels
their unreviewed voxels.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from .cases import Case
from .errors import HybridMIMError
from .inference import DEFAULT_BLEND, DEFAULT_OVERLAP, DEFAULT_WINDOW_BATCH
from .methods import LabelledBatch, StepBatch, get_method
from .methods.supervised import supervised_loss
from .metrics import dice_per_label
from .partial import UNREVIEWED
from .postprocessing import single_piece_labels
from .precision import training_autocast, training_precision
from .progress import CancelToken
from .sampling import PatchSampler
from .semisupervised import ema_update, pseudo_labels, reviewed_targets
from .settings import CHECKPOINT_EVERY, TrainSettings

logger = logging.getLogger(__name__)

@dataclass
class Checkpoint:
    """Where ``train_network`` keeps its state (written atomically every ``every`` steps) and whether to continue
    from it. A resumed run with a step budget ends with the same weights as an uninterrupted one: weights,
    optimiser, EMA teacher, step, time spent and every random state (samplers, mixing, dropout) are restored."""

    path: Path
    every: int = CHECKPOINT_EVERY
    resume: bool = False
    model: dict[str, Any] = field(default_factory=dict)  # ModelCard.layout(): a resumed run needs the same


@dataclass
class TrainProgress:
    """What the loop reports after each step; ``validation_dice`` (mean over labels) only on validation steps."""

    step: int
    fraction: float
    seconds: float
    losses: dict[str, float]
    learning_rate: float
    validation_dice: float | None = None


@dataclass
class TrainResult:
    steps: int
    seconds: float
    hardware: str
    validation_dice: float | None = None


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """Learning-rate factor for a budget known in steps: linear warm-up, then cosine to 0."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def hardware_name(device: torch.device) -> str:
    """The device and the precision training ran in (cards record it)."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {training_precision(device)}"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, " \
           f"{training_precision(device)})"


class _Budget:
    """Fraction of the budget used: the larger of steps done / steps and time spent / minutes (time spent before a
    resume included)."""

    def __init__(self, steps: int | None, minutes: float | None, spent: float = 0.0) -> None:
        self.steps, self.seconds = steps, minutes * 60 if minutes else None
        self.started = time.monotonic() - spent

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def fraction(self, step: int) -> float:
        parts = []
        if self.steps:
            parts.append(step / self.steps)
        if self.seconds:
            parts.append(self.elapsed() / self.seconds)
        return min(max(parts), 1.0)


def validation_dice(network: torch.nn.Module, cases: Sequence[Case], patch_size: Sequence[int],
                    device: torch.device) -> float:
    """Mean foreground Dice over ``cases`` on the model grid (a quick progress measure; model cards use the
    engine's full inference on the original grid)."""
    was_training = network.training
    network.eval()
    scores: list[float] = []
    with torch.inference_mode():
        for case in cases:
            if case.label is None:
                raise HybridMIMError(f"The validation volume '{case.name}' has no label map")
            logits = cast(torch.Tensor, sliding_window_inference(torch.from_numpy(case.image)[None].to(device),
                                                                 tuple(patch_size), DEFAULT_WINDOW_BATCH, network,
                                                                 overlap=DEFAULT_OVERLAP, mode=DEFAULT_BLEND))
            prediction = logits.argmax(1)[0].cpu().numpy()
            scores.extend(dice_per_label(prediction, case.label, list(range(1, logits.shape[1]))).values())
    network.train(was_training)
    return float(np.mean(scores))


def training_mode(network: torch.nn.Module) -> None:
    """Train mode for the layers with weights that learn; the others (frozen weights, and weightless layers such
    as dropout when some weights are frozen) stay in eval mode, so frozen features are the same at every step."""
    network.train()
    if all(p.requires_grad for p in network.parameters()):
        return
    for module in network.modules():
        if not any(p.requires_grad for p in module.parameters()):
            module.eval()


def _single_piece(cases: Sequence[Case]) -> list[int]:
    """The labels that are one piece in every fully corrected volume holding them (``postprocessing``'s test; a
    partly corrected volume's unreviewed voxels may split a structure)."""
    labels = [case.label for case in cases if case.label is not None and not np.any(case.label == UNREVIEWED)]
    values = set().union(*(np.unique(label).tolist() for label in labels)) - {0, UNREVIEWED}
    return single_piece_labels(labels, sorted(values))


def _save_checkpoint(checkpoint: Checkpoint, state: dict[str, Any]) -> None:
    """Write to a temporary file beside it, then rename: a kill leaves the previous checkpoint whole."""
    checkpoint.path.parent.mkdir(parents=True, exist_ok=True)
    partial = checkpoint.path.with_name(checkpoint.path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, checkpoint.path)


def _load_checkpoint(checkpoint: Checkpoint, settings: TrainSettings, device: torch.device) -> dict[str, Any] | None:
    if not (checkpoint.resume and checkpoint.path.is_file()):
        return None
    state = torch.load(checkpoint.path, map_location=device, weights_only=True)  # tensors and plain data only
    saved = {**asdict(TrainSettings()), **state.get("settings", {})}  # settings added since: their defaults
    if saved != asdict(settings) or state.get("model", checkpoint.model) != checkpoint.model:
        raise HybridMIMError(f"The checkpoint {checkpoint.path} is of a run with other settings or another model "
                             "layout (spacing, patch, network); resume with the same ones, or start anew without "
                             "--resume")
    return state


def train_network(network: torch.nn.Module, labeled: Sequence[Case], unlabeled: Sequence[Case],
                  patch_size: Sequence[int], settings: TrainSettings, device: torch.device,
                  validation: Sequence[Case] = (), progress: Callable[[TrainProgress], None] | None = None,
                  cancel: CancelToken | None = None, checkpoint: Checkpoint | None = None,
                  trainable: Collection[str] | None = None) -> TrainResult:
    """Train ``network`` in place on ``device``; returns what happened. Cancelling raises ``Cancelled`` at the next
    step (the caller writes nothing). With ``checkpoint``, the state is saved every ``checkpoint.every`` steps and,
    with ``checkpoint.resume``, the run continues from the saved state. ``trainable``: the names of the only
    parameters that learn (None: all)."""
    settings.check(len(unlabeled))
    method = get_method(settings.method)
    if not labeled:
        raise HybridMIMError("At least one labelled volume is needed")
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    augment: dict[str, Any] = {
        "flip_axes": settings.flip_axes, "foreground_probability": settings.foreground_probability,
        "intensity_jitter": settings.intensity_jitter, "rotation_degrees": settings.rotation_degrees,
        "rotation_axes": settings.rotation_axes,
        "scale_range": settings.scale_range, "spatial_probability": settings.spatial_probability,
        "gamma_probability": settings.gamma_probability, "noise_probability": settings.noise_probability,
        "rot90_axis": settings.rot90_axis}
    labeled_sampler = PatchSampler(labeled, patch_size, settings.seed, **augment)
    unlabeled_sampler = PatchSampler(unlabeled, patch_size, settings.seed + 1, **augment) if unlabeled else None
    single_piece = _single_piece(labeled) if settings.single_piece_pseudo_labels else []

    network.to(device)
    if trainable is not None:
        for name, parameter in network.named_parameters():
            parameter.requires_grad_(name in trainable)
    training_mode(network)
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    autocast = training_autocast(device)
    budget = _Budget(settings.steps, settings.minutes)
    validate_every = settings.validate_every or max(1, (settings.steps or 200) // 10)
    teacher: torch.nn.Module | None = None
    result = TrainResult(0, 0.0, hardware_name(device))
    step, fraction = 0, 0.0
    saved = _load_checkpoint(checkpoint, settings, device) if checkpoint else None
    if saved is not None:
        network.load_state_dict(saved["network"])
        optimizer.load_state_dict(saved["optimizer"])
        if saved["teacher"] is not None:
            teacher = copy.deepcopy(network).eval().requires_grad_(False)
            teacher.load_state_dict(saved["teacher"])
        labeled_sampler.rng.bit_generator.state = saved["labeled_sampler"]
        if unlabeled_sampler is not None:
            unlabeled_sampler.rng.bit_generator.state = saved["unlabeled_sampler"]
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        step, result.validation_dice = saved["step"], saved["validation_dice"]
        budget = _Budget(settings.steps, settings.minutes, saved["seconds"])
        fraction = budget.fraction(step)
        logger.info("resumed at step %d (%.0f s spent)", step, saved["seconds"])
    while fraction < 1.0:
        if cancel is not None:
            cancel.raise_if_cancelled()
        if trainable is not None:
            training_mode(network)  # again after a validation pass
        learning_rate = settings.learning_rate * min(1.0, (step + 1) / settings.warmup_steps) \
            * 0.5 * (1 + math.cos(math.pi * fraction))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        semi = fraction >= settings.supervised_fraction and (method.losses is not None or labeled_sampler.partial)
        if semi and teacher is None:
            teacher = copy.deepcopy(network).eval().requires_grad_(False)
        images, labels = labeled_sampler.batch(settings.batch_size)
        if labels is None:
            raise HybridMIMError("Every labelled volume needs its label map")
        images, labels = images.to(device), labels.to(device)
        with autocast:
            if labeled_sampler.partial and teacher is not None:
                with torch.no_grad():
                    labels, weights = reviewed_targets(labels, *pseudo_labels(teacher(images), settings.confidence,
                                                                              single_piece))
            else:
                labels, weights = reviewed_targets(labels)
            if not semi or method.losses is None:
                if method.warmup is not None:
                    losses = method.warmup(network, LabelledBatch(images, labels, weights, settings, generator))
                else:
                    losses = {"supervised": supervised_loss(network, images, labels, weights)}
            else:
                # settings.check: a semi-supervised method has unlabelled volumes; the teacher is made above
                assert unlabeled_sampler is not None and teacher is not None and method.losses is not None
                unlabeled_images, _ = unlabeled_sampler.batch(settings.unlabeled_batch_size)
                unlabeled_images = unlabeled_images.to(device)
                with torch.no_grad():
                    teacher_labels, confident = pseudo_labels(teacher(unlabeled_images), settings.confidence,
                                                              single_piece)
                losses = method.losses(network, StepBatch(images, labels, weights, unlabeled_images, teacher_labels,
                                                          confident, settings, fraction, generator))
            loss = cast(torch.Tensor, sum(losses.values()))  # a sum of loss tensors (never empty)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if teacher is not None:
            ema_update(teacher, network, settings.ema_decay)
        step += 1
        fraction = budget.fraction(step)
        report = TrainProgress(step, fraction, budget.elapsed(), {k: float(v.detach()) for k, v in losses.items()},
                               learning_rate)
        if validation and (step % validate_every == 0 or fraction >= 1.0):
            report.validation_dice = validation_dice(network, validation, patch_size, device)
            result.validation_dice = report.validation_dice
        if progress is not None:
            progress(report)
        if checkpoint is not None and step % checkpoint.every == 0 and fraction < 1.0:
            _save_checkpoint(checkpoint, {
                "step": step, "seconds": budget.elapsed(), "settings": asdict(settings), "model": checkpoint.model,
                "network": network.state_dict(), "optimizer": optimizer.state_dict(),
                "teacher": teacher.state_dict() if teacher is not None else None,
                "labeled_sampler": labeled_sampler.rng.bit_generator.state,
                "unlabeled_sampler": unlabeled_sampler.rng.bit_generator.state if unlabeled_sampler else None,
                "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                "validation_dice": result.validation_dice})
    network.eval()
    result.steps, result.seconds = step, budget.elapsed()
    logger.info("%s: %d steps in %.0f s on %s", settings.method, step, result.seconds, result.hardware)
    return result
