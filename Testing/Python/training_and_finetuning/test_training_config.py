"""Training configs are read strictly: one shape for every run, unknown keys and wrong types named in one error,
every shipped config valid."""

from __future__ import annotations

import json

import pytest

from conftest import REPO
from hybridmim_training.cli import main
from hybridmim_training.config import ConfigError, PretrainConfig, SupervisedConfig

CONFIGS = REPO / "training" / "configs"


def load(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid_and_has_one_shape(path):
    config = json.loads(path.read_text(encoding="utf-8"))
    parsed = (PretrainConfig if "pretraining" in config else SupervisedConfig).from_dict(config)
    assert parsed.card["id"] and set(config) <= {"card", "training", "pretraining", "data"}


def test_defaults_are_filled_in_and_recorded():
    config = SupervisedConfig.from_dict({"card": {"id": "x"}, "training": {"batch_size": 4}})
    assert (config.settings.steps, config.settings.batch_size, config.validation_fraction) == (2000, 4, 0.2)
    assert config.recorded_settings()["storage"] == "float32" and config.with_steps(7).settings.steps == 7


@pytest.mark.parametrize("change, message", [
    ({"training": {"stpes": 10}}, "'stpes' (did you mean 'steps'?)"),
    ({"training": {"steps": "10"}}, "training.steps must be a whole number or null, not '10'"),
    ({"training": {"learning_rate": True}}, "training.learning_rate must be a number"),
    ({"training": {"flip_axes": 0}}, "training.flip_axes must be a list of whole numbers"),
    ({"training": {"storage": "int8"}}, "'float32' or 'float16'"),
    ({"trainig": {}}, "Unknown key(s) in the config: 'trainig' (did you mean 'training'?)"),
    ({"card": None}, "'card' object"),
    ({"training": {"group_pattern": "patient(\\d+"}}, "group_pattern is not a regular expression"),
])
def test_a_wrong_supervised_config_is_one_error_naming_the_key(change, message):
    with pytest.raises(ConfigError) as error:
        SupervisedConfig.from_dict({**load("la_cnn.json"), **change})
    assert message in str(error.value)


@pytest.mark.parametrize("change, message", [
    ({"pretraining": {"patch_size": 8}}, "Unknown key(s) in pretraining: 'patch_size'. Known: cache_dir"),
    ({"pretraining": {"loss_weights": {"contrast": 1.0}}}, "pretraining.loss_weights: 'contrast'"),
    ({"pretraining": {"region": "centre"}}, "'random' or 'corner'"),
    ({"pretraining": {"volumes_per_step": 1, "crops_per_volume": 1}}, "at least 2 crops a step"),
    ({"data": {"folders": []}}, "names no datalists and no folders"),
    ({"data": {"folders": [["ct", 3]]}}, "data.folders must be a list of lists of strings"),
])
def test_a_wrong_pretraining_config_is_one_error_naming_the_key(change, message):
    with pytest.raises(ConfigError) as error:
        PretrainConfig.from_dict({**load("pretrain_cnn.json"), **change})
    assert message in str(error.value)


def test_the_old_flat_pretraining_shape_is_refused_with_the_new_one_named(tmp_path, capsys):
    flat = {"id": "old", "architecture": {"name": "basicunet"}, "patch_size": 8, "pretraining": {}, "data": {}}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(flat), encoding="utf-8")
    assert main(["pretrain", "--config", str(path), "--output", str(tmp_path / "run")]) == 2
    assert "'card' object" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_spacing_or_pooling_without_a_patch_is_refused_and_none_of_them_is_planned():
    card = {key: value for key, value in load("la_cnn.json")["card"].items() if key != "patch_size"}
    with pytest.raises(ConfigError, match="target_spacing, architecture.args.strides but no patch_size"):
        SupervisedConfig.from_dict({"card": card, "training": {}})
    assert SupervisedConfig.from_dict(load("cardiac_cnn.json")).planned
    assert not SupervisedConfig.from_dict(load("la_cnn.json")).planned
