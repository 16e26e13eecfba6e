"""Inference precision: bf16 autocast only on CPUs with bf16 units and only for models whose card says their
labels were measured to agree with fp32; a fine-tune does not inherit that promise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from hybridmim import precision
from hybridmim.errors import HybridMIMError
from hybridmim.finetune_plan import target_card
from hybridmim.inference import Segmenter
from hybridmim.metrics import dice_per_label
from hybridmim.model_card import ModelCard
from hybridmim.model_store import resolve_model


def test_bf16_only_on_bf16_cpus_for_models_measured_to_agree(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert ModelCard.load(resolve_model("la-cnn")).inference["cpu_bf16"] is True
    assert Segmenter("la-cnn", "cpu").precision == "bf16"
    assert Segmenter("hippocampus-cnn", "cpu").precision == "fp32"  # not in its card: stays fp32
    assert Segmenter("la-cnn", "cpu", precision="fp32").precision == "fp32"
    monkeypatch.setenv(precision.ENVIRONMENT_SWITCH, "0")
    assert Segmenter("la-cnn", "cpu").precision == "fp32"
    monkeypatch.delenv(precision.ENVIRONMENT_SWITCH)
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert Segmenter("la-cnn", "cpu").precision == "fp32"


@pytest.mark.slow
def test_la_cnn_bf16_labels_agree_with_fp32_on_a_held_out_case(shared_data):
    """A crop around the atrium of a validation case (on CPUs without bf16 units PyTorch emulates it: slow, so
    a crop); the same agreement the card's flag rests on (Testing/Benchmarks/benchmark_precision.py)."""
    card = ModelCard.load(resolve_model("la-cnn"))
    name = card.metrics["validation_cases"][0]
    image = sitk.ReadImage(str(shared_data / "la" / "imagesTr" / f"{name}.nii.gz"))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "la" / "labelsTr" / f"{name}.nii.gz")))
    centre = np.argwhere(truth > 0).mean(0).astype(int)[::-1]  # (i, j, k)
    size = [min(s, c) for s, c in zip(image.GetSize(), (112, 112, 64))]
    start = [int(np.clip(c - n // 2, 0, s - n)) for c, n, s in zip(centre, size, image.GetSize())]
    crop = sitk.RegionOfInterest(image, size, start)
    labels = {p: sitk.GetArrayFromImage(Segmenter("la-cnn", "cpu", precision=p).segment(crop))
              for p in ("fp32", "bf16")}
    assert labels["fp32"].sum() > 10000  # the atrium is in the crop
    assert np.count_nonzero(labels["bf16"] != labels["fp32"]) > 0  # bf16 did run
    assert dice_per_label(labels["bf16"], labels["fp32"], [1])[1] >= 0.999


def test_card_flag_is_checked_and_not_inherited_by_a_fine_tune(tmp_path):
    data = json.loads((resolve_model("la-cnn") / "card.json").read_text(encoding="utf-8"))
    parent = ModelCard.from_dict(data)
    card, _ = target_card(parent, None, None)
    assert parent.inference["cpu_bf16"] is True and "cpu_bf16" not in card.inference
    data["inference"]["cpu_bf16"] = "yes"
    with pytest.raises(HybridMIMError, match="cpu_bf16 must be true or false"):
        ModelCard.from_dict(data)
