"""MSD-style ``dataset.json`` lists and a seeded, reproducible train/validation split."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hybridmim.cases import LabeledVolume, source_name

T = TypeVar("T")


def read_datalist(dataset_json: str | Path, key: str = "training") -> list[LabeledVolume]:
    """Cases of ``key`` (the engine's LabeledVolume, as a user's volumes) with paths resolved against the JSON
    file's folder."""
    dataset_json = Path(dataset_json)
    root = dataset_json.parent
    info = json.loads(dataset_json.read_text(encoding="utf-8"))
    modality = dataset_modality(info)
    cases = []
    for entry in info[key]:
        image = entry["image"] if isinstance(entry, dict) else entry
        label = entry.get("label") if isinstance(entry, dict) else None
        cases.append(LabeledVolume(source_name(image, str(image)), root / image, root / label if label else None,
                                   modality))
    return cases


def dataset_modality(info: dict) -> str | None:
    """"CT" or "MRI" from an MSD ``modality`` entry (e.g. {"0": "MRI"}, {"0": "cine MRI"}), None when it names
    neither."""
    named = " ".join(map(str, (info.get("modality") or {}).values())).upper()
    return "CT" if "CT" in named else "MRI" if "MR" in named else None


def seeded_split(items: list[T], key: Callable[[T], str], validation_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic split that depends only on the items' keys and the seed (not on list order, rank or host)."""
    ordered = sorted(items, key=key)
    random.Random(seed).shuffle(ordered)
    count = max(1, round(len(ordered) * validation_fraction)) if validation_fraction > 0 else 0
    return sorted(ordered[count:], key=key), sorted(ordered[:count], key=key)


def split_cases(cases: list[LabeledVolume], validation_fraction: float, seed: int,
                group_pattern: str | None = None) -> tuple[list, list]:
    """Training and validation cases. With ``group_pattern`` the split is over groups (the pattern's first match
    in a case's name, e.g. ``patient\\d+``), so two phases or scans of one patient never straddle it."""
    if group_pattern is None:
        return seeded_split(cases, lambda c: c.name, validation_fraction, seed)
    groups: dict[str, list[LabeledVolume]] = {}
    for case in cases:
        match = re.search(group_pattern, case.name)
        groups.setdefault(match.group(0) if match else case.name, []).append(case)
    train, validation = seeded_split(sorted(groups), str, validation_fraction, seed)
    return ([c for g in train for c in sorted(groups[g], key=lambda c: c.name)],
            [c for g in validation for c in sorted(groups[g], key=lambda c: c.name)])
