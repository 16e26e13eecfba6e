"""Partly corrected volumes: the edited slices are found by comparing with the model's segmentation, the rest is
marked unreviewed on the model grid, training learns from reviewed voxels only until the averaged teacher labels
the rest, and the command line takes IMAGE:LABEL:SEGMENTATION."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import hybridmim.trainer
from conftest import BUNDLED_MODEL, SAMPLE_IMAGE, SAMPLE_LABEL
from hybridmim.cases import load_case
from hybridmim.cli import colon_fields, main
from hybridmim.errors import InputImageError
from hybridmim.model_card import ModelCard
from hybridmim.networks import build_network
from hybridmim.partial import UNREVIEWED, partly_reviewed
from hybridmim.sampling import PatchSampler
from hybridmim.semisupervised import PSEUDO_WEIGHT, reviewed_targets, weighted_dice_ce
from hybridmim.settings import settings_from
from hybridmim.trainer import train_network


def edited(corrected: sitk.Image, slices: list[int], axis: int = 0) -> sitk.Image:
    """A model's segmentation that differs from ``corrected`` on ``slices`` (array axis ``axis``) only: its
    foreground there is erased, as if the model had missed it and the user had painted it in."""
    array = sitk.GetArrayFromImage(corrected)
    index = [slice(None)] * 3
    index[axis] = slices
    array[tuple(index)] = 0
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(corrected)
    return out


def test_the_edited_slices_are_reviewed_and_the_rest_is_not():
    corrected = sitk.ReadImage(str(SAMPLE_LABEL))
    partial, reviewed, slices = partly_reviewed(corrected, edited(corrected, [10, 15]))
    assert (reviewed, slices) == (2, 32)
    labels, truth = sitk.GetArrayFromImage(partial), sitk.GetArrayFromImage(corrected)
    assert np.array_equal(labels[[10, 15]], truth[[10, 15]])
    assert bool((np.delete(labels, [10, 15], axis=0) == UNREVIEWED).all())
    assert partial.GetSpacing() == corrected.GetSpacing() and partial.GetOrigin() == corrected.GetOrigin()
    # the axis can be given (image axis 2 = k = array axis 0)
    assert sitk.GetArrayFromImage(partly_reviewed(corrected, edited(corrected, [10, 15]), axis=2)[0]).tolist() \
        == labels.tolist()


def test_thick_slices_are_edited_in_their_plane(shared_data):
    """ACDC (10 mm slices): two edited slices whose changes cover few rows are still read as two slices."""
    entry = json.loads((shared_data / "acdc" / "dataset.json").read_text(encoding="utf-8"))["training"][0]
    corrected = sitk.ReadImage(str(shared_data / "acdc" / entry["label"]))
    array = sitk.GetArrayFromImage(corrected)
    original = array.copy()
    original[[3, 4]] = np.where(original[[3, 4]] == 1, 0, original[[3, 4]])  # the model missed the RV there
    image = sitk.GetImageFromArray(original)
    image.CopyInformation(corrected)
    partial, reviewed, slices = partly_reviewed(corrected, image)
    assert (reviewed, slices) == (2, array.shape[0])
    assert np.array_equal(sitk.GetArrayFromImage(partial)[[3, 4]], array[[3, 4]])


@pytest.mark.parametrize("problem, message", [
    ("same", "no slice was edited"),
    ("grid", "not on the same grid"),
    ("reserved", "marks unreviewed voxels"),
])
def test_bad_partial_corrections_are_refused(problem, message):
    corrected = sitk.ReadImage(str(SAMPLE_LABEL))
    original = edited(corrected, [12])
    if problem == "same":
        original = corrected
    elif problem == "grid":
        original.SetSpacing((1.0, 1.0, 2.0))
    else:
        corrected = sitk.ChangeLabel(corrected, {2: UNREVIEWED})
    with pytest.raises(InputImageError, match=message):
        partly_reviewed(corrected, original)


def test_unreviewed_voxels_stay_unreviewed_on_a_resampled_model_grid(shared_data):
    """Left atrium 0.625 mm on la-cnn's ~1 mm grid: the reviewed slab keeps the full label's values inside it,
    everything else is unreviewed; without ``partial`` the reserved value is refused as a label."""
    dataset = json.loads((shared_data / "la" / "dataset.json").read_text(encoding="utf-8"))
    entry = sorted(dataset["training"], key=lambda e: e["image"])[0]
    image, corrected = shared_data / "la" / entry["image"], sitk.ReadImage(str(shared_data / "la" / entry["label"]))
    foreground = np.nonzero(sitk.GetArrayViewFromImage(corrected).any(axis=(1, 2)))[0]
    middle = int(foreground.mean())
    slab = list(range(middle - 8, middle + 8))
    partial, _, _ = partly_reviewed(corrected, edited(corrected, slab), axis=2)
    card = ModelCard.load(BUNDLED_MODEL.parent / "la-cnn")
    full = load_case(card, image, corrected).label
    case = load_case(card, image, partial, partial=True, require_foreground=True)
    assert case.label is not None and full is not None
    reviewed = case.label != UNREVIEWED
    planes = np.nonzero(reviewed.any(axis=(0, 1)))[0]  # the model grid is (X, Y, Z): the slab lies along Z
    assert 16 * 0.625 / 1.2 <= len(planes) <= 16 * 0.625 / 0.8 + 1
    assert bool(reviewed[..., planes].all()) and not reviewed[..., [planes[0] - 1, planes[-1] + 1]].any()
    inner = planes[1:-1]
    assert np.array_equal(case.label[..., inner], full[..., inner])
    with pytest.raises(InputImageError, match="has values"):
        load_case(card, image, partial)


def test_partial_crops_hold_reviewed_voxels():
    card = ModelCard.load(BUNDLED_MODEL)
    corrected = sitk.ReadImage(str(SAMPLE_LABEL))
    partial, _, _ = partly_reviewed(corrected, edited(corrected, [12]))
    case = load_case(card, SAMPLE_IMAGE, partial, partial=True)
    sampler = PatchSampler([case], [16, 16, 16], seed=0, foreground_probability=0.0)
    assert sampler.partial
    for _ in range(20):
        _, labels = sampler.sample()
        assert (labels != UNREVIEWED).any()


def test_unreviewed_voxels_count_only_through_the_teacher():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (1, 1, 6, 6, 6), generator=generator)
    labels[..., 3:] = UNREVIEWED
    logits = torch.randn(1, 3, 6, 6, 6, generator=generator)
    targets, weights = reviewed_targets(labels)
    assert bool((weights[..., 3:] == 0).all()) and bool((weights[..., :3] == 1).all())
    assert int(targets.max()) < 3  # a valid class everywhere, so the loss is defined
    assert weighted_dice_ce(logits, targets, weights).item() == pytest.approx(  # as if only the reviewed block
        weighted_dice_ce(logits[..., :3], labels[..., :3], torch.ones_like(weights[..., :3])).item())
    teacher = torch.full_like(labels, 2)
    confident = torch.zeros_like(labels, dtype=torch.float32)
    confident[..., 4:] = 1
    targets, weights = reviewed_targets(labels, teacher, confident)
    assert torch.equal(targets[..., :3], labels[..., :3]) and bool((targets[..., 3:] == 2).all())
    assert bool((weights[..., :3] == 1).all()) and bool((weights[..., 3] == 0).all())
    assert bool((weights[..., 4:] == PSEUDO_WEIGHT).all())


@pytest.mark.parametrize("partial", [True, False])
def test_the_teacher_labels_unreviewed_voxels_after_the_supervised_phase(monkeypatch, partial):
    """Supervised fine-tuning of a partly corrected volume still gets the averaged teacher, after the supervised
    phase only; a fully corrected volume never does."""
    card = ModelCard.load(BUNDLED_MODEL)
    corrected = sitk.ReadImage(str(SAMPLE_LABEL))
    label = partly_reviewed(corrected, edited(corrected, [12, 13]))[0] if partial else corrected
    case = load_case(card, SAMPLE_IMAGE, label, partial=True)
    calls = []
    original = hybridmim.trainer.pseudo_labels

    def spy(logits, *rule):
        calls.append(logits.shape)
        return original(logits, *rule)

    monkeypatch.setattr(hybridmim.trainer, "pseudo_labels", spy)
    torch.manual_seed(0)
    network = build_network(card.architecture["name"], card.in_channels, card.out_channels,
                            **card.architecture.get("args", {}))
    settings = settings_from("supervised", steps=4, labeled=1)
    settings.supervised_fraction = 0.5
    result = train_network(network, [case], [], card.patch_size, settings, torch.device("cpu"))
    assert result.steps == 4
    assert len(calls) == (2 if partial else 0)


def test_command_line_takes_the_segmentation_a_label_was_corrected_from(tmp_path, capsys):
    corrected = sitk.ReadImage(str(SAMPLE_LABEL))
    segmentation = tmp_path / "model-output.nii.gz"
    sitk.WriteImage(edited(corrected, [11, 12, 13]), str(segmentation))
    code = main(["finetune", "--labeled", f"{SAMPLE_IMAGE}:{SAMPLE_LABEL}:{segmentation}", "--steps", "2",
                 "--device", "cpu", "--progress", "none"])
    assert code == 0
    assert "learning from the 3 of 32 slices" in capsys.readouterr().out


def test_colon_fields_keep_windows_drives():
    assert colon_fields(r"C:\a.nii:D:\b.nii:c.nii") == [r"C:\a.nii", r"D:\b.nii", "c.nii"]
    assert colon_fields("a.nii:b.nii") == ["a.nii", "b.nii"]
    with pytest.raises(SystemExit):
        main(["finetune", "--labeled", "a.nii:b.nii:c.nii:d.nii", "--steps", "1"])


def test_single_piece_rule_is_learned_from_fully_corrected_volumes_only():
    """A few reviewed slices say nothing about how many pieces a structure has."""
    from hybridmim.finetune import fine_tune

    corrected = sitk.ReadImage(str(SAMPLE_LABEL))
    kept = {}
    for name, label in (("full", corrected), ("partial", partly_reviewed(corrected, edited(corrected, [12]))[0])):
        folder = fine_tune("hippocampus-cnn", [(str(SAMPLE_IMAGE), label)], [],
                           settings_from("supervised", steps=1, labeled=1), device="cpu")
        kept[name] = json.loads((Path(folder) / "card.json").read_text(encoding="utf-8"))["inference"][
            "largest_component"]
    assert kept["full"] and kept["partial"] == []
