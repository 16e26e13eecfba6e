"""Model cards from folders a user points at: a valid card mutated at random (seeded) loads or gives one
ModelCardError, never another exception; a broken or impostor folder in the user models folder is listed as
skipped and stops no other command; weights the network would take silently but cannot use are refused."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import BUNDLED_MODEL, SAMPLE_IMAGE
from hybridmim.cli import main
from hybridmim.errors import ModelCardError
from hybridmim.model_card import CARD_FILE, ModelCard
from hybridmim.model_store import load_model, scan_models, sha256_of, user_models_dir

VALID = json.loads((BUNDLED_MODEL / CARD_FILE).read_text(encoding="utf-8"))
ODD_VALUES = [None, 0, -1, 7, 10**12, 1e308, float("nan"), float("inf"), True, "", "x" * 5000, "\x1b[31mred",
              "two\nlines", [], {}, [7], [1, 2], [10**9, 1, 1], [[[[]]]], {"name": "unet"}, "1.0.0/../../x"]


def paths(value, prefix=()):
    """Every (nested) key path of a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*prefix, key)
            yield from paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield (*prefix, index)
            yield from paths(item, (*prefix, index))


def mutate(card: dict, rng: np.random.Generator) -> dict:
    card = copy.deepcopy(card)
    for _ in range(int(rng.integers(1, 4))):
        options = list(paths(card))
        path = options[int(rng.integers(len(options)))]
        parent = card
        for key in path[:-1]:
            parent = parent[key]
        if rng.random() < 0.15 and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = ODD_VALUES[int(rng.integers(len(ODD_VALUES)))]
    return card


def test_randomly_mutated_cards_load_or_give_one_card_error(tmp_path):
    outcomes = {"loaded": 0, "refused": 0}
    rng = np.random.default_rng(2026)
    for _ in range(400):
        (tmp_path / CARD_FILE).write_text(json.dumps(mutate(VALID, rng)), encoding="utf-8")
        try:
            ModelCard.load(tmp_path)
            outcomes["loaded"] += 1
        except ModelCardError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 200 and outcomes["loaded"] > 10  # both kinds of mutation occurred


@pytest.mark.parametrize("text, reason", [
    ("null", "JSON object"), ("3", "JSON object"), ('"card"', "JSON object"),
    ("[" * 100000 + "]" * 100000, "not a readable JSON"),
    (json.dumps({**VALID, "patch_size": [10**6, 64, 48]}), "patch_size"),
    (json.dumps({**VALID, "in_channels": 10**6}), "in_channels"),
    (json.dumps({**VALID, "target_spacing": [float("nan"), 1, 1]}), "not a readable JSON"),
    (json.dumps({**VALID, "inference": {"tta_flip_axes": [7]}}), "tta_flip_axes"),
    (json.dumps({**VALID, "inference": {"tta_rot90_axis": "z"}}), "tta_rot90_axis must be axis 0, 1 or 2"),
    (json.dumps({**VALID, "target_spacing": [1.5, 1.5, 10], "inference": {"tta_rot90_axis": 0}}),
     "the same on the other two axes"),
    (json.dumps({**VALID, "target_spacing": None, "inference": {"tta_rot90_axis": 2}}),
     "the same on the other two axes"),
    (json.dumps({**VALID, "labels": [{**VALID["labels"][0], "name": "a\nb"}]}), "plain text"),
    (json.dumps({**VALID, "name": "\x1b[2J"}), "plain text"),
    (json.dumps({**VALID, "labels": [{"value": v, "name": f"l{v}", "color": [0, 0, 0]} for v in range(1, 301)]}),
     "at most 255"),
    (json.dumps({**VALID, "architecture": {"name": "unet", "args": {"channels": [10**7, 2], "strides": [2]}}}),
     "bounded arguments"),
])
def test_crafted_cards_are_refused_with_the_reason(tmp_path, text, reason):
    (tmp_path / CARD_FILE).write_text(text, encoding="utf-8")
    with pytest.raises(ModelCardError, match=reason):
        ModelCard.load(tmp_path)


def test_broken_and_impostor_user_folders_are_skipped_and_said(capsys, tmp_path):
    user_models = user_models_dir()
    user_models.mkdir(parents=True, exist_ok=True)
    (user_models / "broken").mkdir()
    (user_models / "broken" / CARD_FILE).write_text("null", encoding="utf-8")
    impostor = shutil.copytree(BUNDLED_MODEL, user_models / "impostor")
    card = json.loads((impostor / CARD_FILE).read_text(encoding="utf-8"))
    (impostor / CARD_FILE).write_text(json.dumps({**card, "version": "99.0.0"}), encoding="utf-8")
    models, skipped = scan_models()
    assert {path.name for path, _ in skipped} == {"broken", "impostor"}
    assert all(m.card.version != "99.0.0" for m in models)
    assert main(["models"]) == 0
    captured = capsys.readouterr()
    assert "skipped: " in captured.err and "without being a fine-tune" in captured.err
    assert VALID["id"] in captured.out
    output = tmp_path / "labels.nii.gz"  # the default model still segments, from its bundled folder
    assert main(["segment", str(SAMPLE_IMAGE), "-o", str(output), "--quiet"]) == 0 and output.exists()


@pytest.mark.parametrize("damage, reason", [
    (lambda t: t.to(torch.int32), "are torch.int32"),
    (lambda t: torch.full_like(t, float("nan")), "NaN or infinite"),
])
def test_weights_of_the_wrong_type_or_not_finite_are_refused(tmp_path, damage, reason):
    folder = shutil.copytree(BUNDLED_MODEL, tmp_path / "model")
    state = load_file(folder / "model.safetensors")
    name = next(n for n, t in state.items() if t.is_floating_point())
    state[name] = damage(state[name])
    save_file(state, str(folder / "model.safetensors"))
    card = json.loads((folder / CARD_FILE).read_text(encoding="utf-8"))
    card["weights"]["sha256"] = sha256_of(folder / "model.safetensors")
    (folder / CARD_FILE).write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(ModelCardError, match=reason):
        load_model(folder)
