"""A fine-tune's plan, decided once before any training: the starting model (resolved), the new version's card
(id, name, labels), whether the output layer is re-made, and the checked settings (method, budget). Torch-free,
so the Slicer module can show and check it in its own process (which never imports torch)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import HybridMIMError
from .model_card import ID_PATTERN, MAX_LABELS, Label, ModelCard
from .model_store import resolve_model
from .settings import MAX_LABELED, TrainSettings, settings_from

PALETTE = [(0.90, 0.35, 0.30), (0.30, 0.60, 0.90), (0.40, 0.80, 0.40), (0.95, 0.80, 0.30), (0.70, 0.45, 0.85),
           (0.30, 0.80, 0.80), (0.95, 0.55, 0.75), (0.60, 0.60, 0.60)]


@dataclass(frozen=True)
class FineTunePlan:
    parent_folder: Path  # the starting model's folder (an id resolved to its active version)
    parent: ModelCard
    card: ModelCard  # the new version's card, before training facts are filled in
    remake_head: bool  # a new label set (or a pre-trained-only start) gets a new output layer
    settings: TrainSettings  # checked for these volume counts
    labeled: int
    unlabeled: int

    def summary(self) -> str:
        return (f"{self.labeled} labelled and {self.unlabeled} unlabelled volumes, method {self.settings.method}, "
                f"from {self.parent.id} {self.parent.version} to a new version of '{self.card.id}'"
                + (" with a new output layer" if self.remake_head else ""))


def plan_fine_tune(model: str | os.PathLike, labeled: int, unlabeled: int = 0, settings: TrainSettings | None = None,
                   label_names: Sequence[str] | None = None, model_id: str | None = None) -> FineTunePlan:
    """The plan for fine-tuning ``model`` (id or folder) on ``labeled`` corrected and ``unlabeled`` volumes, or
    one error for any bad choice (counts, method, budget, label names, id). ``settings`` None: the defaults for
    these counts (``settings_from``)."""
    if not 1 <= labeled <= MAX_LABELED:
        raise HybridMIMError(f"Fine-tuning needs 1 to {MAX_LABELED} labelled volumes, not {labeled}")
    settings = settings or settings_from(labeled=labeled, unlabeled=unlabeled)
    settings.check(unlabeled)
    folder = resolve_model(model)
    parent = ModelCard.load(folder)
    card, remake_head = target_card(parent, label_names, model_id)
    return FineTunePlan(folder, parent, card, remake_head, settings, labeled, unlabeled)


def target_card(parent: ModelCard, label_names: Sequence[str] | None, model_id: str | None) -> tuple[ModelCard, bool]:
    """The new version's card (before training facts are filled in) and whether the output layer is re-made."""
    card = ModelCard.from_dict({**parent.to_dict(), "metrics": {}, "training": {}}, source=f"model '{parent.id}'")
    card.inference.pop("cpu_bf16", None)  # measured on the parent's weights, not on the new ones
    same = label_names is None or list(label_names) == [label.name for label in parent.labels]
    if label_names is None and parent.task != "segmentation":
        raise HybridMIMError(f"Model '{parent.id}' is pre-trained only: name the structures to learn (labels)")
    if label_names is not None and not same:  # same whenever no names are given
        names = [str(n).strip() for n in label_names]
        if not names or any(not n for n in names) or len(set(names)) != len(names):
            raise HybridMIMError(f"Label names must be distinct and non-empty, not {list(label_names)[:20]}")
        if len(names) > MAX_LABELS:
            raise HybridMIMError(f"A model holds at most {MAX_LABELS} labels (label maps are 8-bit), not "
                                 f"{len(names)}")
        known = {label.name: label for label in parent.labels}
        card.inference.pop("largest_component", None)  # the parent's label values; fine-tuning decides anew
        card.labels = [Label(i + 1, n, known[n].color if n in known else list(PALETTE[i % len(PALETTE)]),
                             known[n].terminology if n in known else None) for i, n in enumerate(names)]
    card.task = "segmentation"
    card.id = model_id or (parent.id if same else f"{parent.id}-{slug(' '.join(card.label_names().values()))}")
    if not ID_PATTERN.fullmatch(card.id):
        raise HybridMIMError(f"Model id '{card.id}' may only use letters, digits, '.', '_' and '-'")
    names = list(card.label_names().values())
    listed = ", ".join(names) if len(names) <= 3 else f"{', '.join(names[:3])} and {len(names) - 3} more"
    card.name = (f"{parent.name} (fine-tuned)" if same else
                 f"{listed} ({parent.modality}), fine-tuned from {parent.id}")
    card.licence = f"{parent.licence} Fine-tuned on the user's own data."
    card.validate(f"the fine-tuned model '{card.id}'")  # label names and counts, before any training
    return card, not same or parent.task != "segmentation"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "custom"
