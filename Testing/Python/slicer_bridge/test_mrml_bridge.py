"""The MRML bridge on real Slicer data objects (PyPI package ``slicer-core``: MRML scene, volume and segmentation
nodes, Slicer's segmentation logic; no application, no Qt). Volume node -> engine -> segmentation node ->
exported labelmap must equal the engine's own output voxel for voxel."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SAMPLE_IMAGE

slicer = pytest.importorskip("slicer", reason="slicer-core is installed by the test set-up (./setup.sh test)")
vtk = pytest.importorskip("vtk")

from hybridmim.imageio import read_volume  # noqa: E402
from HybridMIMSegmentLib.mrml_bridge import (  # noqa: E402
    image_from_volume_node,
    labelmap_array_from_segmentation,
    terminology_tag,
    update_segmentation_node,
)
from mrml_helpers import load_volume_node, reshape  # noqa: E402


def segment_through_bridge(scene, volume_node, segmenter, replace=True, segmentation_node=None):
    image = image_from_volume_node(volume_node)
    labelmap = segmenter.segment(image)
    if segmentation_node is None:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation_node.CreateDefaultDisplayNodes()
    ids = update_segmentation_node(segmentation_node, labelmap, segmenter.card.labels, volume_node, replace)
    return labelmap, segmentation_node, ids


def test_volume_node_geometry_matches_the_file(scene):
    node = load_volume_node(scene, SAMPLE_IMAGE)
    image, expected = image_from_volume_node(node), read_volume(SAMPLE_IMAGE)
    assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(expected))
    assert np.allclose(image.GetOrigin(), expected.GetOrigin(), atol=1e-6)
    assert np.allclose(image.GetDirection(), expected.GetDirection(), atol=1e-6)
    assert np.allclose(image.GetSpacing(), expected.GetSpacing(), atol=1e-6)


def test_oblique_volume_node_geometry_is_carried_in_lps(scene):
    node = load_volume_node(scene, SAMPLE_IMAGE)
    reshape(node)
    image = image_from_volume_node(node)
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    for index in ([0, 0, 0], [5, 7, 3], [34, 47, 31]):
        ras = matrix.MultiplyPoint([*index, 1])[:3]
        lps = image.TransformIndexToPhysicalPoint(index)
        assert np.allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-4)


@pytest.mark.parametrize("oblique", [False, True], ids=["axis-aligned", "oblique"])
def test_sample_exported_labelmap_equals_engine_output(scene, segmenter, oblique):
    node = load_volume_node(scene, SAMPLE_IMAGE)
    if oblique:
        reshape(node)
    labelmap, segmentation_node, ids = segment_through_bridge(scene, node, segmenter)
    engine = sitk.GetArrayFromImage(labelmap)
    assert set(np.unique(engine)) == {0, 1, 2}
    exported = labelmap_array_from_segmentation(segmentation_node, ids, node)
    assert np.array_equal(exported, engine)

    segmentation = segmentation_node.GetSegmentation()
    assert [segmentation.GetSegment(i).GetName() for i in ids] == ["anterior hippocampus", "posterior hippocampus"]
    assert np.allclose(segmentation.GetSegment(ids[0]).GetColor(), segmenter.card.labels[0].color)
    tag = vtk.reference("")
    segmentation.GetSegment(ids[0]).GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), tag)
    assert str(tag) == terminology_tag(segmenter.card.labels[0])
    assert "~SCT^5366008^Hippocampus~" in str(tag)


def test_anisotropic_ct_exported_labelmap_equals_engine_output(scene, segmenter, shared_data):
    """A real CT at 3.2 x 3.2 x 1.5 mm (resampled by the engine to the model's 1 mm and back), rotated."""
    node = load_volume_node(scene, shared_data / "unlabeled" / "ct" / "head_ct_slicer_testing.nrrd")
    reshape(node, (10, 30, 0))
    labelmap, segmentation_node, ids = segment_through_bridge(scene, node, segmenter)
    engine = sitk.GetArrayFromImage(labelmap)
    assert engine.shape == tuple(reversed(node.GetImageData().GetDimensions()))
    assert np.array_equal(labelmap_array_from_segmentation(segmentation_node, ids, node), engine)


def test_rerun_replaces_or_adds_segments(scene, segmenter):
    node = load_volume_node(scene, SAMPLE_IMAGE)
    _, segmentation_node, first_ids = segment_through_bridge(scene, node, segmenter)
    _, _, again_ids = segment_through_bridge(scene, node, segmenter, True, segmentation_node)
    assert again_ids == first_ids and segmentation_node.GetSegmentation().GetNumberOfSegments() == 2
    _, _, added_ids = segment_through_bridge(scene, node, segmenter, False, segmentation_node)
    assert not set(added_ids) & set(first_ids) and segmentation_node.GetSegmentation().GetNumberOfSegments() == 4


def linear_transform(scene, translation, rotation_z, rotation_x, parent=None):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform = vtk.vtkTransform()
    transform.Translate(*translation)
    transform.RotateZ(rotation_z)
    transform.RotateX(rotation_x)
    node.SetMatrixTransformToParent(transform.GetMatrix())
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node


@pytest.mark.parametrize("hierarchy", [False, True], ids=["rotated-translated", "nested"])
def test_results_land_on_the_voxels_of_a_transformed_volume(scene, segmenter, hierarchy):
    """Under a parent transform (rotation + translation), or a transform under another one, the segments hold
    exactly the engine's labels on the volume's own grid: nothing is resampled through the transform."""
    node = load_volume_node(scene, SAMPLE_IMAGE)
    reshape(node)
    outer = linear_transform(scene, (15.0, -7.0, 4.0), 30.0, 12.0)
    parent = linear_transform(scene, (-3.0, 2.0, 9.0), -20.0, 5.0, outer) if hierarchy else outer
    node.SetAndObserveTransformNodeID(parent.GetID())
    labelmap, segmentation_node, ids = segment_through_bridge(scene, node, segmenter)
    assert segmentation_node.GetTransformNodeID() == parent.GetID()
    engine = sitk.GetArrayFromImage(labelmap)
    assert (engine > 0).sum() > 1000
    assert np.array_equal(labelmap_array_from_segmentation(segmentation_node, ids, node), engine)


def test_segments_keep_their_names_and_colours(scene, segmenter):
    """Slicer's terminology selector must not rename a segment the model (and fine-tuning) knows by name."""
    node = load_volume_node(scene, SAMPLE_IMAGE)
    _, segmentation_node, ids = segment_through_bridge(scene, node, segmenter)
    for segment_id in ids:
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
        assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()


def test_temporary_nodes_are_removed(scene, segmenter):
    """Import and export leave only the segmentation and its display node (and Slicer's subject hierarchy)."""
    node = load_volume_node(scene, SAMPLE_IMAGE)

    def node_classes():
        return sorted(scene.GetNthNode(i).GetClassName() for i in range(scene.GetNumberOfNodes())
                      if not scene.GetNthNode(i).IsA("vtkMRMLSubjectHierarchyNode"))

    before = node_classes()
    _, segmentation_node, ids = segment_through_bridge(scene, node, segmenter)
    labelmap_array_from_segmentation(segmentation_node, ids, node)
    assert node_classes() == sorted([*before, "vtkMRMLSegmentationNode", "vtkMRMLSegmentationDisplayNode"])
