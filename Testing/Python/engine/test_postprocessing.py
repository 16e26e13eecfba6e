"""Keeping the largest piece of one-piece structures: what is removed, what is kept, and who decides."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from conftest import REPO, SAMPLE_LABEL
from hybridmim.imageio import read_volume
from hybridmim.inference import Segmenter
from hybridmim.postprocessing import keep_largest_component, largest_piece_share, single_piece_labels


def la_label(shared_data) -> sitk.Image:
    return sitk.ReadImage(str(sorted((shared_data / "la" / "labelsTr").glob("*.nii.gz"))[0]), sitk.sitkUInt8)


def with_island(labelmap: sitk.Image, value: int) -> tuple[sitk.Image, np.ndarray]:
    """The labelmap plus a 5-voxel cube of ``value`` in a corner far from every structure."""
    voxels = sitk.GetArrayFromImage(labelmap)
    island = np.zeros(voxels.shape, bool)
    island[1:6, 1:6, 1:6] = True
    assert not voxels[island].any()
    voxels[island] = value
    result = sitk.GetImageFromArray(voxels)
    result.CopyInformation(labelmap)
    return result, island


def test_stray_island_is_removed_and_the_structure_kept_on_the_same_grid(shared_data):
    reference = la_label(shared_data)
    noisy, island = with_island(reference, 1)
    cleaned = keep_largest_component(noisy, [1])
    assert cleaned.GetSize() == reference.GetSize() and cleaned.GetSpacing() == reference.GetSpacing()
    assert cleaned.GetOrigin() == reference.GetOrigin() and cleaned.GetDirection() == reference.GetDirection()
    assert np.array_equal(sitk.GetArrayFromImage(cleaned), sitk.GetArrayFromImage(reference))
    assert sitk.GetArrayFromImage(keep_largest_component(noisy, []))[island].all()  # not listed: untouched


def test_only_the_listed_values_lose_their_islands():
    reference = sitk.ReadImage(str(SAMPLE_LABEL), sitk.sitkUInt8)
    noisy, island = with_island(reference, 2)
    cleaned = sitk.GetArrayFromImage(keep_largest_component(noisy, [1]))
    assert cleaned[island].all()
    assert not sitk.GetArrayFromImage(keep_largest_component(noisy, [1, 2]))[island].any()


def test_one_piece_structures_are_recognised_from_real_labels(shared_data):
    hippocampus = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_LABEL)))
    atrium = sitk.GetArrayFromImage(la_label(shared_data))
    assert single_piece_labels([hippocampus], [1, 2]) == [1, 2]
    assert single_piece_labels([atrium], [1, 2]) == [1]  # absent from every volume: not decided
    twins = np.concatenate([atrium, np.zeros_like(atrium), atrium], axis=2)  # two atria side by side: two pieces
    assert largest_piece_share(twins, 1) == 0.5
    assert single_piece_labels([atrium, twins], [1]) == []  # one piece in one volume is not enough


def test_the_card_setting_is_applied_by_the_segmenter(shared_data, tmp_path):
    """la-cnn leaves stray islands on this held-out case; its card's setting removes exactly those."""
    model = Path(shutil.copytree(REPO / "Resources" / "Models" / "la-cnn", tmp_path / "la-cnn"))
    volume = read_volume(shared_data / "la" / "imagesTr" / "A4R1S23KR0KU2WSYHK2X.nii.gz")
    cleaned = Segmenter(model, "cpu").segment(volume)
    card = json.loads((model / "card.json").read_text(encoding="utf-8"))
    assert card["inference"]["largest_component"] == [1]
    del card["inference"]["largest_component"]
    (model / "card.json").write_text(json.dumps(card), encoding="utf-8")
    raw = Segmenter(model, "cpu").segment(volume)
    assert largest_piece_share(sitk.GetArrayFromImage(raw), 1) < 0.99
    assert largest_piece_share(sitk.GetArrayFromImage(cleaned), 1) == 1.0
    assert np.array_equal(sitk.GetArrayFromImage(cleaned), sitk.GetArrayFromImage(keep_largest_component(raw, [1])))
