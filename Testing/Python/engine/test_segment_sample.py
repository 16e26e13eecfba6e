"""The bundled model on real held-out cases: Dice against the reference, named segments in the output file."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from conftest import BUNDLED_MODEL, SAMPLE_IMAGE, SAMPLE_LABEL
from hybridmim.cli import main
from hybridmim.imageio import ijk_to_lps, read_volume
from hybridmim.inference import Segmenter
from hybridmim.metrics import dice_per_label
from hybridmim.model_card import ModelCard

TOLERANCE = 0.05


def test_card_reports_measured_validation_dice():
    card = ModelCard.load(BUNDLED_MODEL)
    assert set(card.metrics["dice"]) >= {"anterior hippocampus", "posterior hippocampus", "mean"}
    assert len(card.metrics["validation_cases"]) >= 20
    assert SAMPLE_IMAGE.name.split(".")[0] in card.metrics["validation_cases"]


def test_cli_segments_sample_to_seg_nrrd_with_card_dice(tmp_path, capsys):
    output, preview = tmp_path / "sample.seg.nrrd", tmp_path / "sample.png"
    assert main(["segment", str(SAMPLE_IMAGE), "-o", str(output), "--preview", str(preview), "--quiet"]) == 0
    assert str(output.resolve()) in capsys.readouterr().out
    assert preview.stat().st_size > 1000

    card = ModelCard.load(BUNDLED_MODEL)
    segmentation = slicerio.read_segmentation(str(output))
    assert [s["name"] for s in segmentation["segments"]] == ["anterior hippocampus", "posterior hippocampus"]
    assert np.allclose(segmentation["segments"][0]["color"], card.labels[0].color, atol=1e-3)
    assert segmentation["segments"][1]["terminology"]["type"][2] == "Hippocampus"
    image = read_volume(SAMPLE_IMAGE)
    assert np.allclose(segmentation["ijkToLPS"], ijk_to_lps(image), atol=1e-5)
    assert segmentation["voxels"].shape == image.GetSize()

    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_LABEL))).transpose(2, 1, 0)
    values = np.zeros(reference.shape, np.uint8)
    for segment in segmentation["segments"]:
        values[slicerio.segment_mask(segmentation, segment)] = card.labels[
            [label.name for label in card.labels].index(segment["name"])].value
    dice = dice_per_label(values, reference, [1, 2])
    assert np.mean(list(dice.values())) >= card.metrics["dice"]["mean"] - TOLERANCE


def bundled_segmentation_models():
    from hybridmim.model_store import list_models

    return [m for m in list_models() if m.bundled and m.card.task == "segmentation"]


@pytest.mark.parametrize("model", bundled_segmentation_models(), ids=lambda m: m.card.id)
@pytest.mark.slow
def test_every_bundled_model_reaches_its_card_dice_on_held_out_cases(model, shared_data):
    """Checksum, load, and eight of the validation cases named in the card (never trained on), found by name in
    ../shared/data, through the full read -> segment path."""
    segmenter = Segmenter(model.path, "cpu")  # loading verifies the sha256
    card = segmenter.card
    values = [label.value for label in card.labels]
    scores = []
    for name in card.metrics["validation_cases"][:8]:
        image = next(shared_data.glob(f"*/imagesTr/{name}.nii.gz"))
        label = image.parent.parent / "labelsTr" / image.name
        prediction = sitk.GetArrayFromImage(segmenter.segment(read_volume(image)))
        reference = sitk.GetArrayFromImage(read_volume(label))
        scores.append(np.mean(list(dice_per_label(prediction, reference, values).values())))
    assert np.mean(scores) >= card.metrics["dice"]["mean"] - TOLERANCE


def bundled_pretrained_models():
    from hybridmim.model_store import list_models

    return [m for m in list_models() if m.bundled and m.card.task == "pretrained"]


@pytest.mark.parametrize("model", bundled_pretrained_models(), ids=lambda m: m.card.id)
def test_every_bundled_pretrained_model_loads_and_fine_tunes_on_a_real_case(model):
    """A pre-trained-only model: checksum verified, every encoder and decoder weight used, segmenting refused with
    a clear message, and a few fine-tuning steps on the sample give a model that segments it."""
    from hybridmim.errors import HybridMIMError
    from hybridmim.finetune import fine_tune
    from hybridmim.model_store import initialise_from, read_weights
    from hybridmim.networks import build_network
    from hybridmim.settings import settings_from

    _, card, _ = read_weights(model.path)  # verifies the sha256
    assert card.labels == [] and card.training["steps"] > 0 and card.training["volumes"] > 0
    network = build_network(card.architecture["name"], 1, 3, **card.architecture["args"])
    _, fresh = initialise_from(network, model.path, card.architecture)
    assert len(fresh) == 2 and all(not name.startswith(("encoder", "down", "swinViT")) for name in fresh)
    with pytest.raises(HybridMIMError, match="pre-trained only"):
        Segmenter(model.path, "cpu")
    version = fine_tune(model.path, [(SAMPLE_IMAGE, SAMPLE_LABEL)], settings=settings_from(steps=3), device="cpu",
                        label_names=["anterior hippocampus", "posterior hippocampus"])
    labels = sitk.GetArrayFromImage(Segmenter(version, "cpu").segment(read_volume(SAMPLE_IMAGE)))
    assert labels.shape == sitk.GetArrayFromImage(read_volume(SAMPLE_IMAGE)).shape


@pytest.mark.parametrize("change", ["scaled by 1e-30", "one voxel at 3e38", "int64 around 9e18", "one voxel at -1e30"])
def test_extreme_or_tiny_intensities_still_segment(tmp_path, change):
    """Normalisation statistics are float64, scale-free and not ruled by one corrupt voxel: the labels stay those
    of the clean volume (before, each of these gave empty labels with exit 0)."""
    image = sitk.ReadImage(str(SAMPLE_IMAGE))
    clean = sitk.GetArrayFromImage(Segmenter(BUNDLED_MODEL, "cpu").segment(image))
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    if change == "scaled by 1e-30":
        values = (values * 1e-30).astype(np.float32)
    elif change == "one voxel at 3e38":
        values = values.astype(np.float32)
        values[0, 0, 0] = 3e38
    elif change == "one voxel at -1e30":
        values = values.astype(np.float32)
        values[-1, -1, -1] = -1e30
    else:
        values = (values.astype(np.int64) * 1000 + np.iinfo(np.int64).max // 2)
    altered = sitk.GetImageFromArray(values)
    altered.CopyInformation(image)
    sitk.WriteImage(altered, str(tmp_path / "altered.nrrd"))
    labels = sitk.GetArrayFromImage(Segmenter(BUNDLED_MODEL, "cpu").segment(read_volume(tmp_path / "altered.nrrd")))
    assert clean.any() and min(dice_per_label(labels, clean, [1, 2]).values()) > 0.98
