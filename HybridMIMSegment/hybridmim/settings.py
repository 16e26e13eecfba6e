"""What decides a training run (``TrainSettings``) and how fine-tuning fills it in (``settings_from``).
Torch-free: the Slicer module and the fine-tuning plan check settings in processes that never import torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import HybridMIMError
from .methods import AUTOMATIC, DEFAULT_LEARNING_RATE, check_budget, check_method, default_budget, default_method


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
    confidence: float = 0.8
    unlabeled_weight: float = 1.0
    paste_fraction: float = 2 / 3
    # augmentation (see PatchSampler)
    flip_axes: list[int] = field(default_factory=list)
    foreground_probability: float = 0.33
    intensity_jitter: float = 0.1
    rotation_degrees: float = 0.0
    scale_range: list[float] = field(default_factory=lambda: [1.0, 1.0])
    spatial_probability: float = 0.0
    gamma_probability: float = 0.0
    noise_probability: float = 0.0
    validate_every: int = 0  # steps between validations on the model grid (0: about ten times per run)

    def check(self, unlabeled: int) -> None:
        check_method(self.method, unlabeled)
        check_budget(self.steps, self.minutes)
        if not 0 < self.learning_rate < math.inf:
            raise HybridMIMError(f"The learning rate must be positive and finite, not {self.learning_rate}")
        if not 0 <= self.seed < 2**32:
            raise HybridMIMError(f"The seed must be a whole number from 0 to {2**32 - 1}, not {self.seed}")


def settings_from(method: str | None = None, steps: int | None = None, minutes: float | None = None,
                  seed: int = 0, labeled: int = 1, unlabeled: int = 0, **overrides) -> TrainSettings:
    """Fine-tuning settings: the defaults, a method (None or 'auto': ``default_method`` for these counts) and a
    budget (``DEFAULT_MINUTES`` or ``DEFAULT_STEPS``, whichever comes first, when neither is given)."""
    if method in (None, AUTOMATIC):
        method = default_method(labeled, unlabeled)
    steps, minutes = default_budget(steps, minutes)
    return TrainSettings(method=method, steps=steps, minutes=minutes, seed=seed, **overrides)
