"""Rank volume nodes by the model's uncertainty through the real worker, on real Slicer data objects
(``slicer-core``): the degraded volume comes first, scores equal the engine's, the scene is not changed."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SAMPLE_IMAGE

slicer = pytest.importorskip("slicer", reason="slicer-core is installed by the test set-up (./setup.sh test)")
vtk = pytest.importorskip("vtk")

from hybridmim.errors import HybridMIMError  # noqa: E402
from hybridmim.inference import Segmenter  # noqa: E402
from HybridMIMSegmentLib.mrml_bridge import image_from_volume_node  # noqa: E402
from HybridMIMSegmentLib.ranking import candidate_volumes, rank, start_rank  # noqa: E402
from HybridMIMSegmentLib.segmenting import segment  # noqa: E402
from mrml_helpers import load_volume_node, reshape  # noqa: E402


def test_the_degraded_volume_ranks_first_with_the_engines_scores_and_the_scene_unchanged(scene, tmp_path):
    clean = load_volume_node(scene, SAMPLE_IMAGE, "clean")
    image = sitk.ReadImage(str(SAMPLE_IMAGE))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    noisy = sitk.GetImageFromArray(array + np.random.default_rng(0).normal(0, 0.8 * array.std(), array.shape)
                                   .astype(np.float32))
    noisy.CopyInformation(image)
    sitk.WriteImage(noisy, str(tmp_path / "noisy.nrrd"))
    degraded = load_volume_node(scene, tmp_path / "noisy.nrrd", "noisy")
    reshape(degraded)  # oblique: written to the worker with its exact geometry
    nodes_before = scene.GetNumberOfNodes()

    ranking = rank([clean, degraded], "hippocampus-cnn", "cpu")
    assert [node.GetName() for node, _ in ranking] == ["noisy", "clean"]
    engine = Segmenter("hippocampus-cnn", "cpu")
    for node, score in ranking:
        assert score == pytest.approx(engine.segment_and_score(image_from_volume_node(node))[1], abs=1e-4)
    assert scene.GetNumberOfNodes() == nodes_before

    segmentation = segment(clean, "hippocampus-cnn", "cpu")  # Segment keeps the score of its result
    assert float(segmentation.GetAttribute("HybridMIMSegment.Uncertainty")) == pytest.approx(ranking[1][1], abs=1e-4)


def test_nothing_to_rank_and_pretrained_models_are_refused(scene):
    volume = load_volume_node(scene, SAMPLE_IMAGE)
    with pytest.raises(HybridMIMError, match="Choose the volumes"):
        start_rank([], "hippocampus-cnn")
    with pytest.raises(HybridMIMError, match="pre-trained only"):
        start_rank([volume], "hybridmim-cnn-pretrained")


def test_only_grey_volumes_shown_in_editors_are_candidates(scene):
    grey = load_volume_node(scene, SAMPLE_IMAGE, "grey")
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "label")
    label.SetAndObserveImageData(grey.GetImageData())
    vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    rgb = vtk.vtkImageData()
    rgb.SetDimensions(4, 4, 4)
    rgb.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    vector.SetAndObserveImageData(rgb)
    hidden = load_volume_node(scene, SAMPLE_IMAGE, "hidden")
    hidden.SetHideFromEditors(True)
    scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")  # no voxels
    assert [node.GetName() for node in candidate_volumes(scene)] == ["grey"]
