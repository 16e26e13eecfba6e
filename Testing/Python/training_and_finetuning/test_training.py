"""Supervised training on real hippocampus cases writes a model folder the engine loads, with an honest card."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import REPO
from hybridmim.cases import load_case
from hybridmim.errors import HybridMIMError
from hybridmim.inference import Segmenter
from hybridmim.model_card import ModelCard
from hybridmim.sampling import PatchSampler
from hybridmim_training.datalist import read_datalist, split_cases
from hybridmim_training.supervised import train_supervised


def small_dataset(shared_data, tmp_path, count: int = 10, name: str = "hippocampus"):
    source = shared_data / name
    entries = json.loads((source / "dataset.json").read_text(encoding="utf-8"))["training"][:count]
    dataset = {"training": [{k: str(source / entry[k]) for k in ("image", "label")} for entry in entries]}
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(dataset), encoding="utf-8")
    return path


def test_split_is_seeded_disjoint_and_order_independent(shared_data):
    cases = read_datalist(shared_data / "hippocampus" / "dataset.json")
    train, validation = split_cases(cases, 0.2, seed=0)
    again_train, again_validation = split_cases(list(reversed(cases)), 0.2, seed=0)
    assert [c.name for c in validation] == [c.name for c in again_validation]
    assert not {c.name for c in train} & {c.name for c in validation}
    assert len(train) + len(validation) == len(cases) == 208
    assert [c.name for c in split_cases(cases, 0.2, seed=1)[1]] != [c.name for c in validation]


def hippocampus_case(shared_data, index: int = 0):
    config = json.loads((REPO / "training" / "configs" / "hippocampus_cnn.json").read_text(encoding="utf-8"))
    card = ModelCard.from_dict({**config["card"], "weights": {"file": "model.safetensors", "sha256": ""}})
    entry = read_datalist(shared_data / "hippocampus" / "dataset.json")[index]
    return load_case(card, entry.image, entry.label)


def test_sampler_crops_match_between_image_and_label(shared_data):
    case = hippocampus_case(shared_data)
    sampler = PatchSampler([case], (16, 16, 16), seed=0, foreground_probability=1.0, intensity_jitter=0)
    images, labels = sampler.batch(4)
    assert images.shape == (4, 1, 16, 16, 16) and labels.shape == (4, 1, 16, 16, 16)
    assert all(labels[i].sum() > 0 for i in range(4))  # foreground-centred crops contain the structure
    patch = images[0, 0].numpy()
    hits = np.argwhere(np.isclose(case.image[0], patch[0, 0, 0]))
    assert any(np.array_equal(case.image[0, x:x + 16, y:y + 16, z:z + 16], patch)
               and np.array_equal(case.label[x:x + 16, y:y + 16, z:z + 16], labels[0, 0].numpy())
               for x, y, z in hits)


def test_foreground_crops_are_centred_on_each_label_alike(shared_data):
    """A real CHAOS volume, where the liver has about 8 times the voxels of a kidney: foreground-centred crops are
    centred on each of the four labels about equally often, not in proportion to their voxels."""
    card = ModelCard.load(REPO / "Resources" / "Models" / "abdomen-mri-cnn")  # its planned grid
    entry = read_datalist(shared_data / "chaos_t2" / "dataset.json")[0]
    case = load_case(card, entry.image, entry.label)
    voxels = np.bincount(case.label.ravel(), minlength=5)[1:]
    assert voxels[0] > 4 * voxels[1:].max()  # the liver dominates the labelled voxels
    sampler = PatchSampler([case], (1, 1, 1), seed=0, foreground_probability=1.0, intensity_jitter=0)
    centres = [int(sampler.sample()[1].item()) for _ in range(800)]
    shares = np.bincount(centres, minlength=5)[1:] / len(centres)
    assert np.allclose(shares, 0.25, atol=0.05), shares


def test_gamma_changes_contrast_not_mean_or_spread_and_noise_leaves_labels(shared_data):
    """Gamma bends the patch's intensity curve, keeping its mean and standard deviation; noise changes every
    voxel; neither moves a label."""
    case = hippocampus_case(shared_data)
    plain = PatchSampler([case], (32, 32, 32), seed=3, intensity_jitter=0)
    gamma = PatchSampler([case], (32, 32, 32), seed=3, intensity_jitter=0, gamma_probability=1.0)
    noisy = PatchSampler([case], (32, 32, 32), seed=3, intensity_jitter=0, noise_probability=1.0)
    (image, label), (_, bent_label), (noise, noise_label) = plain.sample(), gamma.sample(), noisy.sample()
    assert np.array_equal(label, bent_label) and np.array_equal(label, noise_label)
    bent = [gamma._gamma(image) for _ in range(10)]
    assert all(abs(b.mean() - image.mean()) < 1e-4 and abs(b.std() - image.std()) < 1e-4 for b in bent)
    assert min(np.corrcoef(b.ravel(), image.ravel())[0, 1] for b in bent) < 0.999  # a curve, not a shift/scale
    assert np.count_nonzero(noise != image) > 0.99 * image.size


def test_quarter_turns_turn_image_and_label_together_about_the_chosen_axis(shared_data):
    """BCP's augmentation: each patch is the plain crop turned 0-3 quarter turns in the plane across the axis, label
    with image; all four turns occur; unequal patch sides across the axis are refused."""
    case = hippocampus_case(shared_data)
    plain = PatchSampler([case], (24, 24, 16), seed=5, intensity_jitter=0, foreground_probability=1.0)
    turned = PatchSampler([case], (24, 24, 16), seed=5, intensity_jitter=0, foreground_probability=1.0,
                          rot90_axis=2)
    seen = set()
    for _ in range(24):
        (image, label), (turned_image, turned_label) = plain.sample(), turned.sample()
        plain.rng.integers(4)  # keep both generators in step: the turned sampler drew its number of turns
        turns = [k for k in range(4) if np.array_equal(np.rot90(image, k, (1, 2)), turned_image)]
        assert len(turns) >= 1 and np.array_equal(np.rot90(label, turns[0], (0, 1)), turned_label)
        seen.add(turns[0])
    assert seen == {0, 1, 2, 3}
    with pytest.raises(HybridMIMError, match="equal patch sides"):
        PatchSampler([case], (24, 24, 16), seed=0, rot90_axis=0)


def test_volume_smaller_than_patch_lands_at_random_places(shared_data):
    """Sliding-window inference centres a small volume in the window; training must not teach one corner."""
    case = hippocampus_case(shared_data)
    shape = case.image.shape[1:]
    sampler = PatchSampler([case], (48, 64, 48), seed=0, foreground_probability=0.0, intensity_jitter=0)
    offsets = set()
    for _ in range(20):
        image, label = sampler.sample()
        inside = np.argwhere(image[0] != 0)
        offset = tuple(inside.min(0))
        x, y, z = offset
        assert np.array_equal(image[0, x:x + shape[0], y:y + shape[1], z:z + shape[2]], case.image[0])
        assert np.array_equal(label[x:x + shape[0], y:y + shape[1], z:z + shape[2]], case.label)
        assert label.sum() == case.label.sum()
        offsets.add(offset)
    assert len(offsets) > 10


@pytest.mark.slow
def test_supervised_training_writes_loadable_model_with_card(shared_data, tmp_path):
    config = json.loads((REPO / "training" / "configs" / "hippocampus_cnn.json").read_text(encoding="utf-8"))
    config["card"]["architecture"]["args"] = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}
    config["training"].update(steps=40, batch_size=2, warmup_steps=5, validation_fraction=0.3, storage="float16")
    output = train_supervised(config, small_dataset(shared_data, tmp_path), tmp_path / "model", device="cpu",
                              log_dir=tmp_path)
    card = ModelCard.load(output)
    assert card.training["steps"] == 40 and card.training["train_cases"] == 7
    assert len(card.metrics["validation_cases"]) == 3
    assert card.inference["largest_component"] == [1, 2]  # each part is one piece in every training label
    assert 0 <= card.metrics["dice"]["mean"] <= 1
    assert set(card.metrics["hd95_mm"]) == {"anterior hippocampus", "posterior hippocampus"}
    # fp16 storage only when the stored weights give the fp32 network's validation Dice (to 0.001)
    storage = card.training["storage"]
    assert set(storage["float16_dice"]) == set(storage["float32_dice"]) == set(card.metrics["dice"])
    half = storage["largest_difference"] <= 0.001
    assert card.weights["dtype"] == ("float16" if half else "float32")
    assert card.metrics["dice"] == (storage["float16_dice"] if half else storage["float32_dice"])
    with safe_open(str(output / "model.safetensors"), "pt") as weights:
        dtypes = {weights.get_tensor(name).dtype for name in weights.keys()}  # noqa: SIM118 (safe_open has no iter)
    dtypes = {dtype for dtype in dtypes if dtype.is_floating_point}
    assert dtypes == ({torch.float16} if half else {torch.float32})
    log = (tmp_path / "train_log.jsonl").read_text(encoding="utf-8")
    losses = [json.loads(line)["loss"] for line in log.splitlines()]
    assert np.mean(losses[-2:]) < losses[0]
    report = json.loads((tmp_path / "evaluation.json").read_text(encoding="utf-8"))
    assert {row["case"] for row in report["cases"]} == set(card.metrics["validation_cases"])
    segmenter = Segmenter(output, "cpu")
    assert segmenter.card.id == "hippocampus-cnn"


def test_rotation_and_scaling_keep_image_and_label_aligned(shared_data):
    """Resample an image that *is* its label: after augmentation the two must still coincide."""
    case = hippocampus_case(shared_data)
    sampler = PatchSampler([case], (48, 64, 48), seed=0, intensity_jitter=0, rotation_degrees=20,
                           scale_range=(0.8, 1.2), spatial_probability=1.0)
    _, labels = PatchSampler([case], (48, 64, 48), seed=1, intensity_jitter=0).batch(4)
    moved_images, moved_labels = sampler._rotate_and_scale(labels.float(), labels)
    assert not torch.equal(moved_labels, labels)
    assert moved_labels.dtype == torch.int64 and set(moved_labels.unique().tolist()) <= {0, 1, 2}
    agreement = (moved_images.round().long() == moved_labels).float().mean()
    assert agreement > 0.98
    assert 0.5 < (moved_labels > 0).sum() / (labels > 0).sum() < 2.0  # scaling stays within (0.8, 1.2)^3


def test_training_plans_what_the_config_leaves_out_and_keeps_patients_together(shared_data, tmp_path):
    """A config without spacing, patch or pooling gets them from the training cases' plan (thick-slice ACDC keeps
    its 10 mm slices); the two frames of a patient never straddle the split."""
    config = json.loads((REPO / "training" / "configs" / "cardiac_cnn.json").read_text(encoding="utf-8"))
    assert "patch_size" not in config["card"] and "target_spacing" not in config["card"]
    config["training"].update(steps=2, warmup_steps=1, validation_fraction=0.34, storage="float32")
    output = train_supervised(config, small_dataset(shared_data, tmp_path, 6, "acdc"), tmp_path / "model",
                              device="cpu")
    card = ModelCard.load(output)
    assert card.target_spacing == [1.5, 1.5, 10.0] and card.patch_size[2] <= 16
    assert card.architecture["args"]["strides"][0] == [2, 2, 1]
    assert card.training["plan"]["fingerprint"]["volumes"] == 4  # planned on the training cases only
    validation = card.metrics["validation_cases"]
    assert len(validation) == 2 and validation[0].split("_")[0] == validation[1].split("_")[0]
    assert card.training["settings"]["group_pattern"] == "patient\\d+"


def test_plan_command_prints_trainings_plan_and_refuses_unknown_networks(shared_data, capsys):
    from hybridmim_training.cli import main

    dataset = str(shared_data / "acdc" / "dataset.json")
    config = str(REPO / "training" / "configs" / "cardiac_cnn.json")
    assert main(["plan", "--dataset", dataset, "--config", config]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["target_spacing"] == [1.5, 1.5, 10.0] and plan["intensity"]["method"] == "zscore"
    assert plan["fingerprint"]["volumes"] == 96 and plan["reasons"]  # the training split: 48 of 60 patients
    assert main(["plan", "--dataset", dataset, "--network", "swinunetr"]) == 0
    assert all(p % 32 == 0 for p in json.loads(capsys.readouterr().out)["patch_size"])
    assert main(["plan", "--dataset", dataset, "--network", "vit"]) == 2
    assert "plans exist for basicunet, swinunetr, unet" in capsys.readouterr().err
    assert main(["plan", "--dataset", dataset, "--config", str(REPO / "training" / "configs" / "la_cnn.json")]) == 2
    assert "gives its own patch_size" in capsys.readouterr().err
