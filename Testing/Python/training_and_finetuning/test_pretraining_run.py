"""HybridMIM pre-training runs on real volumes: the loss falls, an interrupted run resumes to the same weights,
two processes under torchrun (gloo) train and save, and the export is an engine model folder without a head."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, SAMPLE_IMAGE, SAMPLE_LABEL
from hybridmim.errors import HybridMIMError, ModelCardError
from hybridmim.finetune import fine_tune
from hybridmim.model_card import ModelCard
from hybridmim.model_store import load_model, read_weights
from hybridmim.preprocessing import normalize_intensity
from hybridmim.sampling import padded_crop, random_start
from hybridmim.settings import settings_from
from hybridmim_training.pretraining.data import (
    CONTENT_THRESHOLD,
    MIN_CONTENT,
    StepCrops,
    cached_volume,
    intensity_of,
    random_crop,
    sources_from_folder,
)
from hybridmim_training.pretraining.masking import apply_mask, patch_validity, random_patch_mask, voxel_mask
from hybridmim_training.pretraining.pretext import HybridMIMModel
from hybridmim_training.pretraining.pretrain import pretrain

SMALL_VOLUMES = [("unlabeled/ct/head_ct_slicer_testing.nrrd", "ct"), ("unlabeled/mri/spine_t2_sct.nii.gz", "mri"),
                 ("unlabeled/mri/brain_t1gd_pyradiomics1.nrrd", "mri"),
                 ("hippocampus/imagesTr/hippocampus_004.nii.gz", "mri"),
                 ("hippocampus/imagesTr/hippocampus_006.nii.gz", "mri")]


@pytest.fixture
def volumes(shared_data, tmp_path):
    """A few small real CT and MRI volumes in per-modality folders (symbolic links)."""
    for relative, modality in SMALL_VOLUMES:
        folder = tmp_path / "volumes" / modality
        folder.mkdir(parents=True, exist_ok=True)
        (folder / relative.replace("/", "_")).symlink_to(shared_data / relative)
    return tmp_path / "volumes"


def tiny_config(volumes, steps: int, **pretraining) -> dict:
    return {
        "card": {"id": "test-hybridmim-cnn", "target_spacing": [2.0, 2.0, 2.0],
                 "architecture": {"name": "basicunet", "args": {"features": [8, 8, 16, 16, 32, 8], "dropout": 0.1}}},
        "data": {"folders": [[str(volumes / "ct"), "CT"], [str(volumes / "mri"), "MRI"]],
                 "validation_fraction": 0.4},
        "pretraining": {"steps": steps, "volumes_per_step": 2, "crops_per_volume": 2, "learning_rate": 2e-3,
                        "warmup_steps": 3, "save_every": 4, "validate_every": 10, "log_every": 1, "workers": 0,
                        "mask_patch": 8, **pretraining},
    }


def test_ct_in_hounsfield_units_is_windowed_and_mri_is_scaled_robustly():
    """The rule pre-training applies, and the exported card's "auto" intensity applies again at fine-tuning."""
    def normalise(volume, modality):
        return normalize_intensity(volume, intensity_of(modality))

    ct = np.array([-3000.0, -1000.0, 0.0, 1000.0, 3000.0])
    assert normalise(ct, "CT").tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    mri = np.linspace(0, 1000, 1001)
    scaled = normalise(mri, "MRI")
    assert scaled.min() == 0.0 and scaled.max() == 1.0 and abs(scaled[500] - 0.5) < 1e-3
    eight_bit_ct = np.linspace(0, 255, 256)  # not in HU: scaled like MRI
    assert normalise(eight_bit_ct, "CT").max() == 1.0
    assert np.array_equal(normalise(mri - 2000, "MRI"), scaled)  # MRI is never windowed
    # float32 out whatever the method (a float64 input would stop the network at inference)
    assert {normalise(v.astype(np.int16), m).dtype for v, m in ((ct, "CT"), (mri, "MRI"))} == {np.dtype(np.float32)}


def test_crops_depend_on_seed_rank_and_step_only(volumes, tmp_path):
    cached = cached_volumes(volumes, tmp_path)
    first = StepCrops(cached, 48, 2, 2, seed=0, rank=0, first_step=0, total_steps=10)
    resumed = StepCrops(cached, 48, 2, 2, seed=0, rank=0, first_step=6, total_steps=10)
    other_rank = StepCrops(cached, 48, 2, 2, seed=0, rank=1, first_step=0, total_steps=10)
    assert first[0][0].shape == first[0][1].shape == (4, 1, 48, 48, 48)
    assert all(torch.equal(a, b) for a, b in zip(first[6], resumed[0]))
    assert not torch.equal(first[0][0], other_rank[0][0])
    loader = torch.utils.data.DataLoader(first, batch_size=None, num_workers=2)
    assert all(torch.equal(crops, first[i][0]) and torch.equal(valid, first[i][1])
               for i, (crops, valid) in enumerate(loader))


UNET = {"name": "unet", "args": {"channels": [8, 16, 32, 64, 64], "strides": [2, 2, 2, 2], "num_res_units": 1,
                                 "dropout": 0.1}}


def cached_volumes(volumes, tmp_path) -> list:
    """The fixture's volumes at 2 mm, CT and MRI each normalised its own way."""
    sources = sources_from_folder(volumes / "ct", "CT") + sources_from_folder(volumes / "mri", "MRI")
    return [cached_volume(s, [2.0, 2.0, 2.0], tmp_path / "cache") for s in sources]


def test_crops_carry_their_validity_and_little_content_is_redrawn(volumes, tmp_path):
    """Real volumes at 2 mm: padding is 0 and marked invalid; a hippocampus crop (smaller than the crop) is
    mostly padding, flagged as such; a single random draw in a head CT is often mostly air, a redrawn crop never."""
    cached = cached_volumes(volumes, tmp_path)
    rng = np.random.default_rng(0)
    for path in cached:
        volume = np.load(path)
        crop, valid = random_crop(volume, 48, rng)
        assert set(np.unique(valid)) <= {0.0, 1.0} and not crop[valid == 0].any()
        reachable = np.prod([min(extent, 48) for extent in volume.shape])
        assert valid.sum() == reachable  # the whole volume when smaller, else a full crop
    small = np.load(cached[-1])  # hippocampus_006
    assert min(small.shape) < 48 and random_crop(small, 48, rng)[1].mean() < 0.5

    head = np.load(cached[0])  # the head CT: air around the head; 24^3 crops (48 mm) often land in it
    redrawn = [(random_crop(head, 24, rng)[0] > CONTENT_THRESHOLD).mean() for _ in range(60)]
    single = [(padded_crop(head, [random_start(e, 24, rng) for e in head.shape], (24, 24, 24)) > CONTENT_THRESHOLD
               ).mean() for _ in range(60)]
    assert np.mean(np.array(single) < MIN_CONTENT) > 0.1 and min(redrawn) >= MIN_CONTENT


def test_volumes_are_drawn_in_proportion_to_their_voxels(tmp_path):
    """Three volumes of 1 : 8 : 27 voxels, each filled with its own value: the draws follow those shares, also
    with two volumes a step."""
    paths = []
    for index, side in enumerate((16, 32, 48)):
        paths.append(tmp_path / f"volume{index}.npy")
        np.save(paths[-1], np.full((side, side, side), 0.25 * (index + 1), np.float16))
    crops = StepCrops(paths, 16, 2, 1, seed=0, rank=0, first_step=0, total_steps=1000)
    drawn = [int(round(float(crop.max()) / 0.25)) - 1 for i in range(1000) for crop in crops[i][0]]
    shares = np.bincount(drawn, minlength=3) / 2000
    assert np.allclose(shares, np.array([1, 8, 27]) / 36, atol=0.03)


@pytest.mark.slow
def test_the_positive_pair_is_the_nearest_neighbour_at_random_initialisation(volumes, tmp_path):
    """Two dropout passes of the same masked real crop are closer to each other than to any other crop: the
    sample-level task is learnable from the start (with the bottleneck's mean it was not: cosine 0.98 for all)."""
    crops, valid = StepCrops(cached_volumes(volumes, tmp_path), 48, 4, 2, seed=0, rank=0, first_step=0,
                             total_steps=1)[0]
    torch.manual_seed(0)
    model = HybridMIMModel(UNET["name"], UNET["args"], mask_patch=8).train()
    generator = torch.Generator().manual_seed(0)
    mask = voxel_mask(random_patch_mask(8, 6, 0.4, generator, patch_validity(valid, 8)), 8)
    masked = apply_mask(crops, mask)
    with torch.no_grad():
        anchors, positives = model(masked, (0, 0, 0)).embedding, model.embed(masked)
    features = torch.nn.functional.normalize(torch.cat([anchors, positives]), dim=1)
    similarity = (features @ features.t()).fill_diagonal_(-2.0)
    hits = similarity[:8].argmax(1) == torch.arange(8, 16)
    assert hits.float().mean() > 0.5


@pytest.mark.slow
def test_the_contrastive_term_falls_clearly_below_chance_and_snapshots_are_log_spaced(volumes, tmp_path):
    """... and a run resumed from before a snapshot (interrupted after it) passes it again without harm."""
    config = tiny_config(volumes, 120, save_every=90)
    config["card"]["architecture"] = UNET
    run = tmp_path / "run"
    assert pretrain(config, run, device="cpu", stop_after=90) is None
    saved_at_90 = (run / "checkpoint.pt").read_bytes()
    pretrain(config, run, device="cpu", resume=True)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    contrastive = [entry["contrastive"] for entry in log if "contrastive" in entry]
    chance = math.log(2 * 4 - 1)  # 4 crops a step: each has 7 candidates
    assert len(contrastive) == 120 and np.mean(contrastive[35:40]) < 0.75 * chance  # within a few dozen steps
    assert np.mean(contrastive[35:40]) < 0.6 * np.mean(contrastive[:5])  # and it fell: it was learnt
    assert [p.name for p in (run / "snapshots").iterdir()] == ["step-000100"]
    snapshot = ModelCard.load(run / "snapshots" / "step-000100")
    assert snapshot.task == "pretrained" and snapshot.training["steps"] == 100
    final = load_file(run / "model" / "model.safetensors")
    assert ModelCard.load(run / "model").training["steps"] == 120

    (run / "checkpoint.pt").write_bytes(saved_at_90)  # as if interrupted between step 100 and the next checkpoint
    shutil.rmtree(run / "model")
    again = load_file(pretrain(config, run, device="cpu", resume=True) / "model.safetensors")
    assert all(torch.equal(final[k], again[k]) for k in final)


@pytest.mark.slow
def test_loss_falls_on_real_volumes_and_export_has_no_head(volumes, tmp_path):
    config = tiny_config(volumes, 30)
    config["card"]["patch_size"] = [32, 32, 16]
    folder = pretrain(config, tmp_path / "run", device="cpu")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    totals = [entry["total"] for entry in log if "total" in entry]
    assert len(totals) == 30 and np.mean(totals[-5:]) < 0.8 * np.mean(totals[:5])
    assert all(entry["contrastive"] > 0 for entry in log if "contrastive" in entry)
    assert any("validation_total" in entry for entry in log)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))

    _, card, state = read_weights(folder)
    assert card.task == "pretrained" and card.labels == [] and card.training["steps"] == 30
    assert card.patch_size == [32, 32, 16]  # the fine-tuning patch the config asked for, not the 48^3 crop
    assert card.training["hardware"].startswith("1 x CPU") and "hybridmim-train pretrain" in card.training["command"]
    assert set(card.training["modalities"]) == {"CT", "MRI"}
    # the data's own validation fraction (0.4 of 5 volumes; the default would hold out 1)
    assert (card.training["volumes"], card.training["validation_volumes"]) == (3, 2)
    assert not any(name.startswith("final_conv.") for name in state)
    with pytest.raises(ModelCardError, match="pre-trained only"):
        load_model(folder)


@pytest.mark.slow
def test_resume_after_interruption_reproduces_the_uninterrupted_weights(volumes, tmp_path):
    config = tiny_config(volumes, 8)
    straight = pretrain(config, tmp_path / "straight", device="cpu")
    assert pretrain(config, tmp_path / "interrupted", device="cpu", stop_after=4) is None
    assert json.loads((tmp_path / "interrupted" / "log.jsonl").read_text(encoding="utf-8").splitlines()[-1])[
        "step"] == 4
    first_part = torch.load(tmp_path / "interrupted" / "checkpoint.pt", weights_only=True)["seconds"]
    resumed = pretrain(config, tmp_path / "interrupted", device="cpu", resume=True)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the card's time counts the interrupted run's training too, not only the resumed part
    total = torch.load(tmp_path / "interrupted" / "checkpoint.pt", weights_only=True)["seconds"]
    assert total > first_part > 0
    assert round(total) <= ModelCard.load(resumed).training["time_seconds"] <= round(total) + 1


@pytest.mark.slow
def test_two_processes_with_torchrun_train_and_save(volumes, tmp_path):
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(tiny_config(volumes, 4)), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "hybridmim_training.cli", "pretrain", "--config", str(config_path),
                             "--output", str(tmp_path / "run"), "--device", "cpu"],
                            capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900,
                            env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 4
    _, card, _ = read_weights(tmp_path / "run" / "model")
    assert card.task == "pretrained"


def test_supervised_fine_tuning_starts_from_the_pretrained_encoder_and_decoder(shared_data, tmp_path):
    from test_training import small_dataset

    from hybridmim.model_card import ModelCard
    from hybridmim.model_store import initialise_from, save_model
    from hybridmim.networks import build_network
    from hybridmim_training.pretraining.pretext import HybridMIMModel
    from hybridmim_training.supervised import train_supervised

    architecture = {"name": "basicunet", "args": {"features": [8, 8, 16, 16, 32, 8]}}
    pretext = HybridMIMModel("basicunet", architecture["args"], mask_patch=8)
    card = ModelCard.from_dict({"id": "tiny-pretrained", "version": "1.0.0", "name": "tiny", "task": "pretrained",
                                "architecture": architecture, "modality": "MRI", "intensity": {"method": "zscore"},
                                "patch_size": [48, 48, 48], "labels": [], "licence": "test",
                                "weights": {"file": "model.safetensors", "sha256": ""}})
    pretrained = save_model(tmp_path / "pretrained", pretext.backbone_state_without_head(), card)

    network = build_network("basicunet", 1, 3, **architecture["args"])
    source, fresh = initialise_from(network, pretrained, architecture)
    assert source.id == "tiny-pretrained" and fresh == ["final_conv.bias", "final_conv.weight"]
    assert torch.equal(network.down_4.convs.conv_1.conv.weight, pretext.backbone.down_4.convs.conv_1.conv.weight)
    assert torch.equal(network.upcat_1.convs.conv_0.conv.weight, pretext.backbone.upcat_1.convs.conv_0.conv.weight)

    config = json.loads((REPO / "training" / "configs" / "hippocampus_cnn.json").read_text(encoding="utf-8"))
    config["card"]["architecture"] = architecture
    config["training"].update(steps=3, batch_size=2, warmup_steps=1, validation_fraction=0.3)
    folder = train_supervised(config, small_dataset(shared_data, tmp_path, 6), tmp_path / "tuned", device="cpu",
                              init=str(pretrained))
    tuned = ModelCard.load(folder)
    assert tuned.training["initialisation"].startswith("tiny-pretrained 1.0.0")
    with pytest.raises(Exception, match="architecture"):
        initialise_from(build_network("unet", 1, 3, channels=[8, 16], strides=[2]), pretrained,
                        {"name": "unet", "args": {}})

    # interactive fine-tuning from the same pre-trained-only folder: names are required, the head is made anew
    with pytest.raises(HybridMIMError, match="pre-trained only: name the structures"):
        fine_tune(pretrained, [(SAMPLE_IMAGE, SAMPLE_LABEL)], settings=settings_from(steps=2), device="cpu")
    version = fine_tune(pretrained, [(SAMPLE_IMAGE, SAMPLE_LABEL)], settings=settings_from(steps=2), device="cpu",
                        label_names=["anterior", "posterior"])
    card = ModelCard.load(version)
    assert card.task == "segmentation" and [label.name for label in card.labels] == ["anterior", "posterior"]
    assert card.id == "tiny-pretrained-anterior-posterior" and card.training["output_layer"] == "re-made"
    assert card.training["fresh_weights"] == ["final_conv.bias", "final_conv.weight"]
