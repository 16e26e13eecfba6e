"""Fine-tuning methods: the registry, the automatic choice and the check of a user's choice.

One file per method in this package defines its ``METHOD`` (name, label and tooltip for the Slicer panel and the
command line, its losses); ``REGISTERED`` at the end lists them in the order the panel shows them. The
trainer, the CLI choices and the Slicer panel all read the registry. Importable without torch (method files import
it inside their loss functions): the Slicer panel lists and checks methods in Slicer's own process, which never
imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import HybridMIMError

if TYPE_CHECKING:
    import torch

AUTOMATIC = "auto"  # let default_method choose

AUTOMATIC_TOOLTIP = ("BCP for a single corrected segmentation with unlabelled volumes, otherwise Supervised: what "
                     "measured best on the left-atrium benchmark for a few minutes of training (docs/fine-tuning.md).")


@dataclass(frozen=True)
class StepBatch:
    """What a semi-supervised step works on: labelled patches with their targets and per-voxel weights
    (``semisupervised.reviewed_targets``), unlabelled patches with the EMA teacher's labels and where it is
    confident, the run's settings, how far the run is (0..1) and the step's random generator."""

    images: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    unlabeled: torch.Tensor
    teacher_labels: torch.Tensor
    confident: torch.Tensor
    settings: Any  # hybridmim.settings.TrainSettings
    fraction: float
    generator: torch.Generator


@dataclass(frozen=True)
class LabelledBatch:
    """What a supervised step works on: labelled patches, their targets and per-voxel weights, the run's settings
    and the step's random generator."""

    images: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    settings: Any  # hybridmim.settings.TrainSettings
    generator: torch.Generator


#: ``(network, batch) -> named losses`` of one semi-supervised step (they are summed).
SemiSupervisedLosses = Callable[["torch.nn.Module", StepBatch], "dict[str, torch.Tensor]"]
#: ``(network, batch) -> named losses`` of one step of the supervised phase.
SupervisedLosses = Callable[["torch.nn.Module", LabelledBatch], "dict[str, torch.Tensor]"]


@dataclass(frozen=True)
class Method:
    """A fine-tuning method. ``losses`` None: supervised only; otherwise the run starts with a supervised phase
    (``warmup``'s losses; None: plain Dice + cross-entropy) and then calls ``losses`` with an EMA teacher's
    pseudo-labels (``hybridmim.trainer``). ``recipe``: the settings the method's published recipe uses, which
    ``settings.settings_from`` applies unless the caller overrides them."""

    name: str  # as typed on the command line and stored in cards
    label: str  # as shown in the Slicer panel
    tooltip: str
    losses: SemiSupervisedLosses | None = None
    warmup: SupervisedLosses | None = None
    recipe: Mapping[str, Any] = field(default_factory=dict)

    @property
    def needs_unlabeled(self) -> bool:
        return self.losses is not None


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise HybridMIMError(f"Unknown method '{name}': use one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def default_method(labeled: int, unlabeled: int) -> str:
    """BCP for a single corrected volume with unlabelled ones, supervised otherwise. Measured (docs/fine-tuning.md):
    from one labelled left atrium, BCP beat supervised-only by 9 Dice points on the unlabelled
    volumes in the same minutes; from three or five, supervised-only was as good or better (the semi-supervised
    methods' extra passes cost it about half its steps)."""
    return "bcp" if labeled == 1 and unlabeled > 0 else "supervised"


def check_method(method: str, unlabeled: int) -> None:
    if get_method(method).needs_unlabeled and unlabeled == 0:
        raise HybridMIMError(f"Method '{method}' needs unlabelled volumes; give some or use 'supervised'")


from . import bcp, mean_teacher, supervised  # noqa: E402  (after Method: each file builds its METHOD with it)

REGISTERED = (supervised.METHOD, mean_teacher.METHOD, bcp.METHOD)
_REGISTRY = {method.name: method for method in REGISTERED}
METHODS = tuple(_REGISTRY)
#: Display names and tooltips (the Slicer panel, the CLI help), in the order the panel lists them.
METHOD_LABELS = {AUTOMATIC: "Automatic", **{m.name: m.label for m in _REGISTRY.values()}}
METHOD_TOOLTIPS = {AUTOMATIC: AUTOMATIC_TOOLTIP, **{m.name: m.tooltip for m in _REGISTRY.values()}}
