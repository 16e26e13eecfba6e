"""The JSON model card: everything needed to run a model and to judge it, next to its weights."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from .errors import ModelCardError

# Names that become folder and file names: nothing read from or written for a card may leave its folder.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]{0,39}")
FILE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

# Bounds of the typed card schema: a card is read from any folder a user points at, so every number that sizes an
# allocation or indexes an axis is bounded, and text that is printed or written into file headers is plain.
MAX_LABELS = 255  # label maps are uint8
MAX_PATCH = 512
MAX_IN_CHANNELS = 16
MAX_ARCHITECTURE_INT = 4096
MAX_WINDOW_BATCH = 64
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
TEXT_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # long texts may hold newlines and tabs
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")

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

    def layout(self) -> dict[str, Any]:
        """What a training checkpoint must match to be resumed: grid, patch, network and normalisation (a plan
        made again from changed data or planning rules must not continue an older run's weights)."""
        return {"target_spacing": self.target_spacing, "patch_size": self.patch_size,
                "architecture": self.architecture, "intensity": asdict(self.intensity)}

    def save(self, folder: Path) -> None:
        """Standard JSON only: a measurement that came out NaN (no structure found) is written as null."""
        text = json.dumps(_finite_or_none(self.to_dict()), indent=2, allow_nan=False)
        (Path(folder) / CARD_FILE).write_text(text + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model card") -> ModelCard:
        if not isinstance(data, dict):
            raise ModelCardError(f"{source}: a model card is a JSON object, not {type(data).__name__}")
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
        except (TypeError, ValueError, AttributeError, KeyError) as error:  # a list where an object belongs, ...
            raise ModelCardError(f"{source}: {error}") from error
        card.validate(source)
        return card

    @classmethod
    def load(cls, folder: Path) -> ModelCard:
        path = Path(folder) / CARD_FILE
        if not path.is_file():
            raise ModelCardError(f"No {CARD_FILE} in model folder {folder}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
            raise ModelCardError(f"{path}: not a readable JSON model card ({error})") from error
        return cls.from_dict(data, source=str(path))

    def validate(self, source: str = "model card") -> None:
        def fail(message: str) -> NoReturn:
            raise ModelCardError(f"{source}: {message}")

        check_schema(self.to_dict(), fail)
        if self.intensity.method not in INTENSITY_METHODS:
            fail(f"intensity.method must be one of {INTENSITY_METHODS}, not '{self.intensity.method}'")
        if self.intensity.method == "ct_window" and not self.intensity.window:
            fail("intensity.window must be [low, high] for ct_window")
        if "blend" in self.inference and self.inference["blend"] not in ("constant", "gaussian"):
            fail(f"inference.blend must be 'constant' or 'gaussian', not '{self.inference['blend']}'")
        if "cpu_bf16" in self.inference and not isinstance(self.inference["cpu_bf16"], bool):
            fail(f"inference.cpu_bf16 must be true or false, not {self.inference['cpu_bf16']!r}")
        largest = self.inference.get("largest_component", [])
        if not isinstance(largest, list) or any(v not in [label.value for label in self.labels] for v in largest):
            fail(f"inference.largest_component must list label values of this model, not {largest!r}")
        if self.task not in ("segmentation", "pretrained"):
            fail(f"task must be 'segmentation' or 'pretrained', not '{self.task}'")
        values = [label.value for label in self.labels]
        if sorted(values) != list(range(1, len(values) + 1)) or (not values and self.task == "segmentation"):
            fail("labels must have values 1..N without gaps (0 is background)")
        if not isinstance(self.id, str) or not ID_PATTERN.fullmatch(self.id):
            fail(f"id must be letters, digits, '.', '_' or '-' (at most 100), not {self.id!r}")
        if not isinstance(self.version, str) or not VERSION_PATTERN.fullmatch(self.version) or ".." in self.version:
            fail(f"version must be letters, digits, '.', '+' or '-' (at most 40), not {self.version!r}")
        weights_file = self.weights.get("file")
        if not isinstance(weights_file, str) or not FILE_PATTERN.fullmatch(weights_file) or ".." in weights_file:
            fail(f"weights.file must be a file name inside the model folder, not {weights_file!r}")


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not standard JSON")


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_number(value: Any, low: float = -math.inf, high: float = math.inf) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            and low <= value <= high)


def _numbers(value: Any, count: int, low: float = -math.inf, high: float = math.inf) -> bool:
    return isinstance(value, list) and len(value) == count and all(_is_number(v, low, high) for v in value)


def _plain_architecture_args(value: Any, depth: int = 0) -> bool:
    """Network arguments: finite numbers, whole numbers up to MAX_ARCHITECTURE_INT, short lists and strings."""
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, int):
        return -1 <= value <= MAX_ARCHITECTURE_INT
    if isinstance(value, float):
        return math.isfinite(value) and abs(value) <= MAX_ARCHITECTURE_INT
    if isinstance(value, str):
        return len(value) <= 100 and not CONTROL_CHARACTERS.search(value)
    if isinstance(value, list) and depth < 3:
        return len(value) <= 32 and all(_plain_architecture_args(v, depth + 1) for v in value)
    if isinstance(value, dict) and depth < 3:
        return len(value) <= 64 and all(isinstance(k, str) and _plain_architecture_args(v, depth + 1)
                                        for k, v in value.items())
    return False


def check_schema(data: dict[str, Any], fail: Callable[[str], NoReturn]) -> None:
    """The typed, bounded card schema (types, ranges, plain text); ``fail(message)`` raises."""
    for key in ("id", "version", "name", "modality", "task"):
        if not isinstance(data.get(key), str) or CONTROL_CHARACTERS.search(data[key]) or len(data[key]) > 200:
            fail(f"{key} must be plain text of at most 200 characters")
    for key in ("description", "licence", "intended_use"):
        if not isinstance(data.get(key), str) or TEXT_CONTROL_CHARACTERS.search(data[key]):
            fail(f"{key} must be plain text (no control characters)")
    for key in ("architecture", "weights", "training", "metrics", "inference"):
        if not isinstance(data.get(key), dict):
            fail(f"{key} must be a JSON object")
    architecture = data["architecture"]
    if not isinstance(architecture.get("name"), str) or not isinstance(architecture.get("args", {}), dict) \
            or not _plain_architecture_args(architecture.get("args", {})):
        fail(f"architecture must name a network and give plain, bounded arguments (whole numbers up to "
             f"{MAX_ARCHITECTURE_INT}), not {str(architecture)[:200]}")
    if not _is_int(data.get("in_channels"), 1, MAX_IN_CHANNELS):
        fail(f"in_channels must be a whole number from 1 to {MAX_IN_CHANNELS}")
    patch = data.get("patch_size")
    if not (isinstance(patch, list) and len(patch) == 3 and all(_is_int(p, 1, MAX_PATCH) for p in patch)):
        fail(f"patch_size must be three whole numbers from 1 to {MAX_PATCH}, not {str(patch)[:100]}")
    spacing = data.get("target_spacing")
    if spacing is not None and not _numbers(spacing, 3, 1e-3, 100.0):
        fail(f"target_spacing must be null or three numbers from 0.001 to 100 mm, not {str(spacing)[:100]}")
    intensity = data["intensity"]
    if not isinstance(intensity, dict) or not isinstance(intensity.get("method"), str):
        fail("intensity must be an object with a method")
    if intensity.get("window") is not None and not (_numbers(intensity["window"], 2)
                                                    and intensity["window"][0] < intensity["window"][1]):
        fail("intensity.window must be [low, high] with low < high")
    if intensity.get("percentiles") is not None and not (_numbers(intensity["percentiles"], 2, 0, 100)
                                                         and intensity["percentiles"][0] < intensity["percentiles"][1]):
        fail("intensity.percentiles must be [low, high] with 0 <= low < high <= 100")
    labels = data.get("labels")
    if not isinstance(labels, list) or len(labels) > MAX_LABELS:
        fail(f"labels must be a list of at most {MAX_LABELS} labels")
    for label in labels:
        if not isinstance(label, dict) or not _is_int(label.get("value"), 1, MAX_LABELS):
            fail(f"each label needs a whole-number value from 1 to {MAX_LABELS}")
        name = label.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 128 or CONTROL_CHARACTERS.search(name):
            fail(f"label names must be plain text of 1 to 128 characters, not {str(name)[:60]!r}")
        if not _numbers(label.get("color"), 3, 0.0, 1.0):
            fail(f"label '{name}': color must be three numbers from 0 to 1")
        terminology = label.get("terminology")
        if terminology is not None and (not isinstance(terminology, dict) or CONTROL_CHARACTERS.search(
                json.dumps(terminology, ensure_ascii=False))):
            fail(f"label '{name}': terminology must be an object of plain text")
    weights = data["weights"]
    if not isinstance(weights.get("sha256"), str) or not (weights["sha256"] == "" or
                                                          SHA256_PATTERN.fullmatch(weights["sha256"])):
        fail("weights.sha256 must be 64 lowercase hexadecimal digits")
    if weights.get("dtype", "float32") not in ("float32", "float16"):
        fail("weights.dtype must be float32 or float16")
    inference = data["inference"]
    if "overlap" in inference and not _is_number(inference["overlap"], 0.0, 0.95):
        fail("inference.overlap must be a number from 0 to 0.95")
    if "window_batch" in inference and not _is_int(inference["window_batch"], 1, MAX_WINDOW_BATCH):
        fail(f"inference.window_batch must be a whole number from 1 to {MAX_WINDOW_BATCH}")
    flips = inference.get("tta_flip_axes", [])
    if not (isinstance(flips, list) and all(_is_int(a, 0, 2) for a in flips) and len(set(flips)) == len(flips)):
        fail(f"inference.tta_flip_axes must list distinct axes 0, 1 or 2, not {str(flips)[:60]}")
    if "tta_rot90_axis" in inference:
        axis = inference["tta_rot90_axis"]
        if not _is_int(axis, 0, 2):
            fail(f"inference.tta_rot90_axis must be axis 0, 1 or 2, not {str(axis)[:60]}")
        spacing = data.get("target_spacing")
        across = None if spacing is None else [s for a, s in enumerate(spacing) if a != axis]
        if across is None or not math.isclose(*across, rel_tol=1e-3):
            fail(f"inference.tta_rot90_axis {axis} needs a target spacing that is the same on the other two axes "
                 f"(a 90 degree turn), not {spacing}")
