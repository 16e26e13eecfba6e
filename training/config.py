"""Training configs: one JSON shape for every kind of run, read strictly.

    {"card": {...}, "training": {...}}                         hybridmim-train supervised
    {"card": {...}, "pretraining": {...}, "data": {...}}       hybridmim-train pretrain

``card`` is the model card the run writes, less what the run measures (weights, metrics). Every other section is
checked against the settings it configures: an unknown key is an error that names it (and the closest known key),
so a typo never silently falls back to a default. Each setting's default is defined once, in the dataclass of its
section; supervised training's steps, learning rate and warm-up differ from fine-tuning's: SUPERVISED_DEFAULTS.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridmim.errors import HybridMIMError
from hybridmim.settings import CHECKPOINT_EVERY, TrainSettings

SUPERVISED_SECTIONS = {"card", "training"}
#: Where supervised training from a dataset departs from TrainSettings' defaults (which are fine-tuning's): a
#: longer budget, a higher peak learning rate and a longer warm-up.
SUPERVISED_DEFAULTS: dict[str, Any] = {"steps": 2000, "learning_rate": 2e-3, "warmup_steps": 100}
PRETRAINING_SECTIONS = {"card", "pretraining", "data"}


class ConfigError(HybridMIMError):
    """A training config that cannot be used as written."""


@dataclass(frozen=True)
class SupervisedConfig:
    """Supervised training from a labelled dataset (``training`` section: every TrainSettings field plus the
    keys below)."""

    card: dict[str, Any]
    settings: TrainSettings
    validation_fraction: float = 0.2  # of the cases, held out (seeded, by name) and never trained on
    group_pattern: str | None = None  # regex: cases whose names share its first match (a patient) stay together
    checkpoint_every: int = CHECKPOINT_EVERY  # steps between checkpoints in --log-dir
    storage: str = "float32"  # "float16": stored half precision when the validation Dice is unchanged

    @classmethod
    def from_dict(cls, config: Any) -> SupervisedConfig:
        _check_sections(config, SUPERVISED_SECTIONS, "supervised training")
        own = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("card", "settings")}
        training = dict(config.get("training", {}))
        _check_keys(training, {*own, *(f.name for f in dataclasses.fields(TrainSettings))}, "training")
        section = {name: training.pop(name) for name in list(training) if name in own}
        if section.get("group_pattern") is not None:
            try:
                re.compile(section["group_pattern"])
            except (re.error, TypeError) as error:
                raise ConfigError(f"training.group_pattern is not a regular expression: {error}") from error
        if section.get("storage", "float32") not in ("float32", "float16"):
            raise ConfigError(f"training.storage must be 'float32' or 'float16', not {section['storage']!r}")
        settings = TrainSettings(**{**SUPERVISED_DEFAULTS, **training})
        _check_types(settings, "training")
        card = dict(config["card"])
        geometry = [key for key in ("target_spacing", "patch_size") if key in card]
        if "strides" in (card.get("architecture") or {}).get("args", {}):
            geometry.append("architecture.args.strides")
        if geometry and "patch_size" not in card:
            raise ConfigError(f"card gives {', '.join(geometry)} but no patch_size: give the spacing, patch and "
                              "pooling together, or leave all of them out to have them planned from the data")
        return _check_types(cls(card=card, settings=settings, **section), "training")

    @property
    def planned(self) -> bool:
        """Whether the card's spacing, patch and pooling are left to the plan made from the training cases."""
        return "patch_size" not in self.card

    def with_steps(self, steps: int | None) -> SupervisedConfig:
        """The config with its step budget replaced (``--steps``); unchanged for None."""
        if steps is None:
            return self
        return dataclasses.replace(self, settings=dataclasses.replace(self.settings, steps=steps))

    def recorded_settings(self) -> dict[str, Any]:
        """Every setting of the run, defaults included, for the card."""
        return {**dataclasses.asdict(self.settings), "validation_fraction": self.validation_fraction,
                "group_pattern": self.group_pattern,
                "checkpoint_every": self.checkpoint_every, "storage": self.storage}


@dataclass(frozen=True)
class LossWeights:
    reconstruction: float = 1.0
    count: float = 0.1
    location: float = 0.1
    consistency: float = 0.01
    contrastive: float = 0.1


@dataclass(frozen=True)
class PretrainSettings:
    """The ``pretraining`` section. ``mask_patch``: side of one masking patch in voxels; a crop is 6 x 6 x 6
    patches (16: the paper's 96^3 crop)."""

    steps: int = 1000
    volumes_per_step: int = 4
    crops_per_volume: int = 2
    mask_patch: int = 16
    mask_ratio: float = 0.4
    region: str = "random"  # which 2x2x2 block of sub-volumes the decoder reconstructs: "random" or "corner"
    loss_weights: LossWeights = field(default_factory=LossWeights)
    temperature: float = 0.5
    learning_rate: float = 1e-4
    weight_decay: float = 1e-3
    warmup_steps: int = 500
    save_every: int = 500
    snapshots: bool = True  # export the model at log-spaced steps (100, 200, 500, 1000, ...) into <output>/snapshots
    validate_every: int = 500
    log_every: int = 10
    workers: int = 2
    seed: int = 0
    cache_dir: str | None = None  # where resampled volumes are cached (default: <output>/cache)


@dataclass(frozen=True)
class PretrainData:
    """The ``data`` section: MSD ``dataset.json`` lists (images only) and plain folders as [path, modality]."""

    datalists: list[str] = field(default_factory=list)
    folders: list[list[str]] = field(default_factory=list)
    validation_fraction: float = 0.1  # of the volumes, held out for the validation losses


@dataclass(frozen=True)
class PretrainConfig:
    card: dict[str, Any]
    settings: PretrainSettings
    data: PretrainData

    @classmethod
    def from_dict(cls, config: Any) -> PretrainConfig:
        _check_sections(config, PRETRAINING_SECTIONS, "pre-training")
        pretraining = dict(config.get("pretraining", {}))
        _check_keys(pretraining, {f.name for f in dataclasses.fields(PretrainSettings)}, "pretraining")
        weights = pretraining.pop("loss_weights", {})
        _check_keys(weights, {f.name for f in dataclasses.fields(LossWeights)}, "pretraining.loss_weights")
        if pretraining.get("region", "random") not in ("random", "corner"):
            raise ConfigError(f"pretraining.region must be 'random' or 'corner', not {pretraining['region']!r}")
        data = config.get("data", {})
        _check_keys(data, {f.name for f in dataclasses.fields(PretrainData)}, "data")
        if not data.get("datalists") and not data.get("folders"):
            raise ConfigError("The pre-training config's data section names no datalists and no folders")
        settings = PretrainSettings(**pretraining, loss_weights=_check_types(LossWeights(**weights),
                                                                             "pretraining.loss_weights"))
        if _check_types(settings, "pretraining").volumes_per_step * settings.crops_per_volume < 2:
            raise ConfigError("pretraining needs at least 2 crops a step (volumes_per_step x crops_per_volume): "
                              "the contrastive term needs negatives and its projection head normalises over the batch")
        return cls(card=dict(config["card"]), settings=_check_types(settings, "pretraining"),
                   data=_check_types(PretrainData(**data), "data"))


def read_config(path: Path) -> dict[str, Any]:
    """A config file's JSON object, or one ConfigError naming the file."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConfigError(f"Cannot read the config {path}: {error}") from error
    if not isinstance(config, dict):
        raise ConfigError(f"The config {path} must be a JSON object")
    return config


def _check_sections(config: Any, allowed: set[str], kind: str) -> None:
    if not isinstance(config, dict) or not isinstance(config.get("card"), dict):
        raise ConfigError(f"A {kind} config is a JSON object with a 'card' object (the model card to write)")
    _check_keys(config, allowed, "the config")
    for name in allowed - {"card"}:
        if not isinstance(config.get(name, {}), dict):
            raise ConfigError(f"The config's '{name}' section must be a JSON object")


def _check_keys(section: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(section) - known)
    if unknown:
        hints = [f"'{key}'" + (f" (did you mean '{close[0]}'?)" if (close := difflib.get_close_matches(key, known, 1))
                               else "") for key in unknown]
        raise ConfigError(f"Unknown key(s) in {where}: {', '.join(hints)}. Known: {', '.join(sorted(known))}")


Checked = typing.TypeVar("Checked")


def _check_types(instance: Checked, where: str) -> Checked:
    """Each field of a settings dataclass holds a value of its declared type (a JSON number where a number
    belongs, a list where a list belongs), or one ConfigError naming the key."""
    hints = typing.get_type_hints(type(instance))
    for item in dataclasses.fields(instance):  # type: ignore[arg-type]
        value = getattr(instance, item.name)
        if item.name not in ("card", "settings", "data") and not _matches(value, hints[item.name]):
            raise ConfigError(f"{where}.{item.name} must be {_describe(hints[item.name])}, not {value!r}")
    return instance


def _matches(value: Any, hint: Any) -> bool:
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, argument) for argument in arguments)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, arguments[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint in (int, float):  # JSON: a whole number is a valid float; a bool is neither
        return isinstance(value, int if hint is int else (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any, plural: bool = False) -> str:
    names = {int: "whole number", float: "number", str: "string"}
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(argument, plural) for argument in arguments)
    if origin is list:
        return ("lists of " if plural else "a list of ") + _describe(arguments[0], True)
    if hint in names:
        return f"{names[hint]}s" if plural else f"a {names[hint]}"
    return {bool: "true or false", type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))
