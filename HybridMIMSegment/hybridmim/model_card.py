"""The JSON model card: everything needed to run a model and to judge it, next to its weights."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelCardError

# Names that become folder and file names: nothing read from or written for a card may leave its folder.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]{0,39}")
FILE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

CARD_FILE = "card.json"
WEIGHTS_FILE = "model.safetensors"
INTENSITY_METHODS = ("zscore", "ct_window", "percentile", "auto")


@dataclass
class Label:
    """One output class. ``color`` is RGB in [0, 1]; ``terminology`` follows Slicer's segment terminology
    (``category`` / ``type`` as [coding scheme, code value, code meaning])."""

    value: int
    name: str
    color: list[float]
    terminology: dict[str, Any] | None = None


@dataclass
class Intensity:
    """How raw voxel values become network input: per-volume z-score (MRI), a fixed window scaled to [0, 1]
    (CT, in HU), robust percentile scaling to [0, 1], or ``auto``: the window for CT in HU, else percentiles
    (models pre-trained on CT and MRI)."""

    method: str
    window: list[float] | None = None
    percentiles: list[float] | None = None


@dataclass
class ModelCard:
    id: str
    version: str
    name: str
    description: str
    architecture: dict[str, Any]
    modality: str
    intensity: Intensity
    target_spacing: list[float] | None
    patch_size: list[int]
    labels: list[Label]
    licence: str
    weights: dict[str, str]
    in_channels: int = 1
    task: str = "segmentation"  # or "pretrained": encoder + decoder without a segmentation head
    intended_use: str = "Research use only; not for diagnosis."
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    inference: dict[str, Any] = field(default_factory=dict)

    @property
    def out_channels(self) -> int:
        """Background plus one channel per label."""
        return len(self.labels) + 1

    def label_names(self) -> dict[int, str]:
        return {label.value: label.name for label in self.labels}

    def largest_component_names(self) -> list[str]:
        """Names of the structures whose largest piece alone is kept after inference."""
        names = self.label_names()
        return [names[v] for v in self.inference.get("largest_component", [])]

    def validation_summary(self) -> str:
        """Validation Dice, against the starting model's on the same volumes when a fine-tune measured both.
        Fine-tuning a model of the same structures on a few volumes like its training data can lower it: say so."""
        dice = self.metrics.get("dice") or {}
        if "mean" not in dice:
            return ""
        text = "Validation Dice: " + ", ".join(f"{name} {value:.3f}" for name, value in dice.items())
        before = (self.metrics.get("starting_model_dice") or {}).get("mean")
        if before is None:
            return text
        change = dice["mean"] - before
        text += f" (starting model {before:.3f}, {change:+.3f})"
        if change < 0:
            text += (". Lower than the starting model on these volumes: go back to the earlier version unless "
                     "they are unlike your other images")
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, folder: Path) -> None:
        (Path(folder) / CARD_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model card") -> ModelCard:
        required = ("id", "version", "name", "architecture", "modality", "intensity", "patch_size", "labels",
                    "licence", "weights")
        missing = [key for key in required if key not in data]
        if missing:
            raise ModelCardError(f"{source}: missing field(s) {', '.join(missing)}")
        try:
            intensity = Intensity(**data["intensity"])
            labels = [Label(**label) for label in data["labels"]]
            known = set(cls.__dataclass_fields__)
            card = cls(**{**{k: v for k, v in data.items() if k in known}, "intensity": intensity, "labels": labels,
                          "description": data.get("description", ""), "target_spacing": data.get("target_spacing")})
        except TypeError as error:
            raise ModelCardError(f"{source}: {error}") from error
        card.validate(source)
        return card

    @classmethod
    def load(cls, folder: Path) -> ModelCard:
        path = Path(folder) / CARD_FILE
        if not path.is_file():
            raise ModelCardError(f"No {CARD_FILE} in model folder {folder}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelCardError(f"{path}: not a readable JSON model card ({error})") from error
        return cls.from_dict(data, source=str(path))

    def validate(self, source: str = "model card") -> None:
        def fail(message: str) -> None:
            raise ModelCardError(f"{source}: {message}")

        if "name" not in self.architecture:
            fail("architecture needs a 'name'")
        if self.intensity.method not in INTENSITY_METHODS:
            fail(f"intensity.method must be one of {INTENSITY_METHODS}, not '{self.intensity.method}'")
        if self.intensity.method == "ct_window" and (not self.intensity.window or len(self.intensity.window) != 2):
            fail("intensity.window must be [low, high] for ct_window")
        if len(self.patch_size) != 3 or any(int(p) < 1 for p in self.patch_size):
            fail("patch_size must be three positive integers")
        if self.target_spacing is not None and (
            len(self.target_spacing) != 3 or any(s <= 0 for s in self.target_spacing)
        ):
            fail("target_spacing must be three positive numbers or null")
        if self.inference.get("blend", "constant") not in ("constant", "gaussian"):
            fail(f"inference.blend must be 'constant' or 'gaussian', not '{self.inference['blend']}'")
        if not 0 <= float(self.inference.get("overlap", 0.25)) < 1:
            fail("inference.overlap must be in [0, 1)")
        window_batch = self.inference.get("window_batch", 1)
        if not isinstance(window_batch, int) or isinstance(window_batch, bool) or window_batch < 1:
            fail(f"inference.window_batch must be a positive whole number, not {window_batch!r}")
        if not isinstance(self.inference.get("cpu_bf16", False), bool):
            fail(f"inference.cpu_bf16 must be true or false, not {self.inference['cpu_bf16']!r}")
        largest = self.inference.get("largest_component", [])
        if not isinstance(largest, list) or any(v not in [label.value for label in self.labels] for v in largest):
            fail(f"inference.largest_component must list label values of this model, not {largest!r}")
        if self.task not in ("segmentation", "pretrained"):
            fail(f"task must be 'segmentation' or 'pretrained', not '{self.task}'")
        values = [label.value for label in self.labels]
        if sorted(values) != list(range(1, len(values) + 1)) or (not values and self.task == "segmentation"):
            fail("labels must have values 1..N without gaps (0 is background)")
        if "sha256" not in self.weights or "file" not in self.weights:
            fail("weights needs 'file' and 'sha256'")
        if not isinstance(self.id, str) or not ID_PATTERN.fullmatch(self.id):
            fail(f"id must be letters, digits, '.', '_' or '-' (at most 100), not {self.id!r}")
        if not isinstance(self.version, str) or not VERSION_PATTERN.fullmatch(self.version) or ".." in self.version:
            fail(f"version must be letters, digits, '.', '+' or '-' (at most 40), not {self.version!r}")
        weights_file = self.weights["file"]
        if not isinstance(weights_file, str) or not FILE_PATTERN.fullmatch(weights_file) or ".." in weights_file:
            fail(f"weights.file must be a file name inside the model folder, not {weights_file!r}")
