"""The uncertainty score and ``hybridmim rank``: the volume a model is least sure about is listed first."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import SAMPLE_IMAGE
from hybridmim.cli import main
from hybridmim.uncertainty import uncertainty_score


def test_score_is_zero_when_certain_one_when_guessing_and_ignores_far_background():
    certain = torch.zeros(3, 4, 4, 4)
    certain[0], certain[1, :2] = 1.0, 1.0
    certain[0, :2] = 0.0
    assert uncertainty_score(certain) == pytest.approx(0.0, abs=1e-6)
    guessing = torch.full((3, 4, 4, 4), 1 / 3)
    assert uncertainty_score(guessing) == pytest.approx(1.0, abs=1e-6)
    nothing = torch.zeros(3, 4, 4, 4)
    nothing[0] = 1.0
    assert uncertainty_score(nothing) == 0.0
    for background_slabs in (2, 20):  # far background, however much of it, does not dilute the score
        volume = torch.zeros(3, 2 + background_slabs, 4, 4)
        volume[:, 0] = 1 / 3  # guessing
        volume[1, 1] = 1.0  # certain structure
        volume[0, 2:] = 1.0  # certain background
        assert uncertainty_score(volume) == pytest.approx(0.5, abs=1e-6)

def noisy_copy(tmp_path):
    image = sitk.ReadImage(str(SAMPLE_IMAGE))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    noisy = sitk.GetImageFromArray(array + np.random.default_rng(0).normal(0, 0.8 * array.std(), array.shape)
                                   .astype(np.float32))
    noisy.CopyInformation(image)
    path = tmp_path / "noisy.nii.gz"
    sitk.WriteImage(noisy, str(path))
    return path


def test_rank_lists_the_degraded_volume_first_and_writes_nothing(tmp_path, capsys):
    noisy = noisy_copy(tmp_path)
    assert main(["rank", str(SAMPLE_IMAGE), str(noisy), "--device", "cpu", "--progress", "json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    result = records[-1]
    assert result["event"] == "result" and result["id"] == "hippocampus-cnn"
    ranking = result["ranking"]
    assert [r["volume"] for r in ranking] == [str(noisy), str(SAMPLE_IMAGE)]
    assert 0 < ranking[1]["uncertainty"] < ranking[0]["uncertainty"] < 1
    fractions = [r["fraction"] for r in records if r["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noisy.nii.gz"]


def test_rank_checks_every_input_before_any_work(tmp_path, capsys):
    assert main(["rank", str(SAMPLE_IMAGE), str(tmp_path / "missing.nii.gz"), "--progress", "json"]) == 2
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["event"] for r in records] == ["error"] and "missing.nii.gz" in records[0]["message"]


def test_segment_reports_the_score(tmp_path, capsys):
    output = tmp_path / "labels.nii.gz"
    assert main(["segment", str(SAMPLE_IMAGE), "-o", str(output), "--device", "cpu", "--progress", "json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["event"] == "result" and 0 < result["uncertainty"] < 1


def test_uncertainty_map_has_the_input_geometry_and_is_high_on_boundaries(tmp_path, capsys):
    """An oblique, anisotropic input: the map is on its exact grid, 0-1, highest where structures meet the
    background or each other and near zero far from them."""
    image = sitk.ReadImage(str(SAMPLE_IMAGE))
    image.SetSpacing((1.1, 0.9, 1.3))
    angle = np.radians(20)
    image.SetDirection((np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1))
    image.SetOrigin((10.0, -5.0, 3.0))
    source = tmp_path / "oblique.nii.gz"
    sitk.WriteImage(image, str(source))
    out, uncertainty = tmp_path / "labels.nii.gz", tmp_path / "uncertainty.nrrd"
    assert main(["segment", str(source), "-o", str(out), "--uncertainty-map", str(uncertainty), "--device", "cpu",
                 "--progress", "json"]) == 0
    result = [json.loads(line) for line in capsys.readouterr().out.splitlines()][-1]
    assert result["uncertainty_map"] == str(uncertainty.resolve())
    written, labels = sitk.ReadImage(str(uncertainty)), sitk.ReadImage(str(out))
    for a in (written, labels):
        assert a.GetSize() == image.GetSize() and np.allclose(a.GetSpacing(), image.GetSpacing())
        assert np.allclose(a.GetOrigin(), image.GetOrigin()) and np.allclose(a.GetDirection(), image.GetDirection())
    values, label_array = sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(labels)
    assert written.GetPixelID() == sitk.sitkFloat32 and values.min() >= 0 and values.max() <= 1
    boundary = sitk.GetArrayFromImage(sitk.LabelContour(labels)) > 0
    far = sitk.GetArrayFromImage(sitk.BinaryDilate(labels > 0, [4, 4, 4])) == 0
    assert label_array.any() and boundary.any() and far.any()
    assert values[boundary].mean() > 0.2 > 0.02 > values[far].mean()


def test_uncertainty_map_is_not_a_segmentation_file(tmp_path):
    out = tmp_path / "labels.nii.gz"
    assert main(["segment", str(SAMPLE_IMAGE), "-o", str(out), "--uncertainty-map",
                 str(tmp_path / "map.seg.nrrd"), "--device", "cpu"]) == 2
    assert not any(tmp_path.iterdir())
