"""What decides a training run (``TrainSettings``), fine-tuning's defaults and budget, and how fine-tuning fills
the settings in (``settings_from``).
Torch-free: the Slicer module and the fine-tuning plan check settings in processes that never import torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import HybridMIMError
from .methods import AUTOMATIC, check_method, default_method, get_method

#: The budget when none is given: whichever comes first. On a 2-core CPU the minutes end it; the
#: steps are meant to end it on a GPU (the GPU round time is not measured yet: docs/fine-tuning.md).
DEFAULT_MINUTES = 5.0
DEFAULT_STEPS = 3000
DEFAULT_LEARNING_RATE = 1e-3  # peak (AdamW, warm-up then cosine); lower values change a trained model less
MAX_LABELED = 20  # interactive fine-tuning is for a few volumes; more belongs to offline training
CHECKPOINT_EVERY = 500  # steps between checkpoints of a resumable run


def default_budget(steps: int | None, minutes: float | None) -> tuple[int | None, float | None]:
    """Neither given: ``DEFAULT_STEPS`` or ``DEFAULT_MINUTES``, whichever comes first."""
    if steps is None and minutes is None:
        return DEFAULT_STEPS, DEFAULT_MINUTES
    return steps, minutes


def check_budget(steps: int | None, minutes: float | None) -> None:
    if not steps and not minutes:
        raise HybridMIMError("Give a budget: a number of steps, of minutes, or both")
    if (steps is not None and steps < 1) or (minutes is not None and not (0 < minutes < math.inf)):
        raise HybridMIMError("The budget (steps, minutes) must be positive and finite")


@dataclass
class TrainSettings:
    """Everything that decides a training run. ``steps`` and ``minutes`` are budgets: the first reached ends it
    (at least one must be set)."""

    method: str = "supervised"
    steps: int | None = None
    minutes: float | None = None
    batch_size: int = 2
    unlabeled_batch_size: int = 2
    learning_rate: float = DEFAULT_LEARNING_RATE
    weight_decay: float = 1e-5
    warmup_steps: int = 20
    seed: int = 0
    # semi-supervised
    supervised_fraction: float = 0.2
    ema_decay: float = 0.99
    confidence: float = 0.8  # pseudo-labels count where the teacher's top probability reaches this (0: everywhere)
    single_piece_pseudo_labels: bool = False  # labels one piece in every corrected volume: largest piece only
    unlabeled_weight: float = 1.0
    paste_fraction: float = 2 / 3
    # augmentation (see PatchSampler)
    flip_axes: list[int] = field(default_factory=list)
    rot90_axis: int | None = None  # random quarter turns about this axis (its plane's patch sides must be equal)
    foreground_probability: float = 0.33
    intensity_jitter: float = 0.1
    rotation_degrees: float = 0.0
    rotation_axes: list[int] = field(default_factory=lambda: [0, 1, 2])  # rotations about these axes only
    scale_range: list[float] = field(default_factory=lambda: [1.0, 1.0])
    spatial_probability: float = 0.0
    gamma_probability: float = 0.0
    noise_probability: float = 0.0
    validate_every: int = 0  # steps between validations on the model grid (0: about ten times per run)
    # a probe of what the starting weights encode: only the output layer learns (what depends on the number of
    # classes: for the MONAI UNet its last up-sampling block); frozen layers run in eval mode
    head_only: bool = False

    def check(self, unlabeled: int) -> None:
        check_method(self.method, unlabeled)
        check_budget(self.steps, self.minutes)
        if not 0 < self.learning_rate < math.inf:
            raise HybridMIMError(f"The learning rate must be positive and finite, not {self.learning_rate}")
        if len(set(self.rotation_axes)) != len(self.rotation_axes) or not set(self.rotation_axes) <= {0, 1, 2}:
            raise HybridMIMError(f"rotation_axes must be distinct axes 0, 1, 2, not {self.rotation_axes}")
        if isinstance(self.rot90_axis, bool) or self.rot90_axis not in (None, 0, 1, 2):
            raise HybridMIMError(f"rot90_axis must be 0, 1, 2 or none, not {self.rot90_axis}")
        if not 0 <= self.seed < 2**32:
            raise HybridMIMError(f"The seed must be a whole number from 0 to {2**32 - 1}, not {self.seed}")


def settings_from(method: str | None = None, steps: int | None = None, minutes: float | None = None,
                  seed: int = 0, labeled: int = 1, unlabeled: int = 0, **overrides) -> TrainSettings:
    """Fine-tuning settings: the defaults, a method (None or 'auto': ``default_method`` for these counts) with its
    published recipe (``Method.recipe``) under ``overrides``, and a budget (``DEFAULT_MINUTES`` or
    ``DEFAULT_STEPS``, whichever comes first, when neither is given)."""
    if method in (None, AUTOMATIC):
        method = default_method(labeled, unlabeled)
    steps, minutes = default_budget(steps, minutes)
    return TrainSettings(method=method, steps=steps, minutes=minutes, seed=seed,
                         **{**get_method(method).recipe, **overrides})
