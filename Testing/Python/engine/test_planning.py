"""Plans made from the data: isotropic, thick-slice and tiny inputs get the spacing, pooling and patch a planner
should give them, and the planned network runs on its planned patch."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from hybridmim.cases import LabeledVolume
from hybridmim.errors import HybridMIMError, InputImageError
from hybridmim.networks import build_network
from hybridmim.planning import (
    MIN_COVERAGE,
    MIN_FEATURE_SIZE,
    PATCH_VOXEL_BUDGET,
    fingerprint,
    plan_for,
    plan_for_network,
)
from hybridmim_training.datalist import read_datalist


def volumes(shared_data, dataset: str, count: int = 12) -> list[LabeledVolume]:
    return read_datalist(shared_data / dataset / "dataset.json")[:count]


def runs_on_its_patch(plan, out_channels: int = 2) -> bool:
    """The planned UNet accepts the planned patch and returns a score map of the same size."""
    card = plan.apply({"architecture": {"name": "unet"}})
    network = build_network("unet", 1, out_channels, **card["architecture"]["args"]).eval()
    with torch.no_grad():
        out = network(torch.zeros(1, 1, *plan.patch_size))
    return tuple(out.shape[2:]) == tuple(plan.patch_size)


def pools(plan) -> list[int]:
    return [sum(level[axis] == 2 for level in plan.strides) for axis in range(3)]


def test_isotropic_small_crops_keep_their_spacing_and_fit_one_patch(shared_data):
    plan = plan_for(fingerprint(volumes(shared_data, "hippocampus"), "MRI"))
    assert plan.target_spacing == [1.0, 1.0, 1.0]
    median = plan.fingerprint["median_shape"]
    assert all(p >= m for p, m in zip(plan.patch_size, median))  # a whole crop fits in one patch
    assert all(p % 2 ** n == 0 and p // 2 ** n >= MIN_FEATURE_SIZE for p, n in zip(plan.patch_size, pools(plan)))
    assert plan.intensity["method"] == "zscore"
    assert runs_on_its_patch(plan)


def test_thick_slices_are_kept_and_pooled_last(shared_data):
    """ACDC (1.5 x 1.5 x 10 mm): the slice axis is not upsampled, not pooled while in-plane voxels are finer than
    half its spacing, and the patch spans the slices a stack has."""
    data = fingerprint(volumes(shared_data, "acdc"), "MRI")
    plan = plan_for(data)
    assert plan.target_spacing == [1.5, 1.5, 10.0]
    assert [level[2] for level in plan.strides[:2]] == [1, 1] and pools(plan)[:2] == [4, 4]
    assert pools(plan)[2] <= 1
    assert plan.patch_size[2] >= np.median([shape[2] for shape in data.shapes])
    assert math.prod(plan.patch_size) <= PATCH_VOXEL_BUDGET
    assert any("thick slices" in reason for reason in plan.reasons)
    assert runs_on_its_patch(plan, out_channels=4)


def test_large_thick_slice_volumes_are_coarsened_in_plane_only(shared_data):
    """CHAOS (256 x 256 x ~36 at 1.25 x 1.25 x 7.7 mm) does not fit one patch: in-plane spacing grows until a patch
    covers a quarter of the median volume; the slice axis keeps its own spacing."""
    plan = plan_for(fingerprint(volumes(shared_data, "chaos_t2", 10), "MRI"))
    assert plan.target_spacing[2] == pytest.approx(7.7)
    assert 1.25 < plan.target_spacing[0] == plan.target_spacing[1] < 7.7
    median = plan.fingerprint["median_shape"]
    shape = [round(m * 1.25 / s) for m, s in zip(median[:2], plan.target_spacing[:2])] + [median[2]]
    assert math.prod(min(p, n) for p, n in zip(plan.patch_size, shape)) / math.prod(shape) >= MIN_COVERAGE - 0.02
    assert all(p // 2 ** n >= MIN_FEATURE_SIZE for p, n in zip(plan.patch_size, pools(plan)))  # at the bottleneck
    assert runs_on_its_patch(plan, out_channels=5)


def test_tiny_volumes_are_pooled_less_and_padded_not_refused():
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(100, 20, (6, 10, 12)).astype(np.float32))
    image.SetSpacing((0.8, 0.8, 0.8))
    plan = plan_for(fingerprint([LabeledVolume("tiny", image)]))
    assert plan.target_spacing == pytest.approx([0.8, 0.8, 0.8])
    assert all(p >= n for p, n in zip(plan.patch_size, (12, 10, 6)))
    assert plan.patch_size == [12, 10, 8]  # padded to at least 8 voxels a side
    assert pools(plan) == [1, 1, 1]  # 12 -> 6, 10 -> 5, 8 -> 4; once more would leave fewer than 4
    assert runs_on_its_patch(plan)


def test_ct_gets_a_window_from_its_foreground_and_fixed_pooling_networks_get_multiples(shared_data):
    ct = LabeledVolume("chest", shared_data / "unlabeled" / "ct" / "chest_ct_pyradiomics_lung1.nrrd")
    plan = plan_for(fingerprint([ct]), fixed_divisor=16)  # recognised as CT in HU by its air
    assert plan.intensity["method"] == "ct_window"
    low, high = plan.intensity["window"]
    assert low < -500 and high > 0  # air to soft tissue and bone, in HU
    assert plan.strides is None and all(p % 16 == 0 for p in plan.patch_size)
    offset = LabeledVolume("head", shared_data / "unlabeled" / "ct" / "head_ct_slicer_testing.nrrd")  # 0-based
    assert plan_for(fingerprint([offset])).intensity["method"] == "zscore"
    assert plan_for(fingerprint([offset], "CT")).intensity["method"] == "ct_window"  # when the data says CT
    kept = plan_for(fingerprint([ct]), intensity={"method": "auto", "window": None, "percentiles": None})
    assert kept.intensity["method"] == "auto" and any("kept from the starting model" in r for r in kept.reasons)


def test_plan_keeps_a_configs_own_normalisation_and_drops_levels_that_pool_nothing(shared_data):
    plan = plan_for(fingerprint(volumes(shared_data, "hippocampus"), "MRI"))
    assert plan.strides[-1] == [1, 1, 1]  # 36 x 50 x 36 crops: the fourth level would pool nothing
    filled = plan.apply({"architecture": {"name": "unet"}, "intensity": {"method": "percentile"}})
    assert filled["intensity"]["method"] == "percentile" and filled["patch_size"] == plan.patch_size
    assert len(filled["architecture"]["args"]["strides"]) == 3 and filled["architecture"]["args"]["channels"] == \
        [16, 32, 64, 128]
    assert filled["training"]["plan"]["reasons"] == plan.reasons
    given = {"architecture": {"name": "unet", "args": {"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2]}},
             "intensity": {"method": "percentile"}}
    replaced = plan.apply(given, replace=True)  # a fine-tune: the parent's channels, planned strides
    assert len(replaced["architecture"]["args"]["strides"]) == 4 and replaced["intensity"] == plan.intensity
    json.dumps(replaced)  # the card records it as plain JSON


def test_networks_without_known_pooling_and_bad_inputs_are_refused_before_planning(shared_data):
    with pytest.raises(HybridMIMError, match="plans exist for basicunet, swinunetr, unet"):
        plan_for_network(fingerprint(volumes(shared_data, "acdc", 2)), {"name": "segresnet"})
    with pytest.raises(HybridMIMError, match="at least one volume"):
        fingerprint([])
    case = volumes(shared_data, "acdc", 2)
    with pytest.raises(InputImageError, match="geometry of its image"):
        fingerprint([LabeledVolume("mixed", case[0].image, volumes(shared_data, "chaos_t2", 1)[0].label)])
