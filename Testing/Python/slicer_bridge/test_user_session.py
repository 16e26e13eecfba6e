"""A user's session, scripted on real Slicer data objects (``slicer-core``) with the module's own scene-level code
and the real worker process: segment a transformed volume, correct the result (remove a slab, add a blob),
fine-tune a few steps, segment again. The corrected segmentation must come out unchanged voxel for voxel and the
new result must be in a new node; a segmentation of one volume is never rewritten for another."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SAMPLE_IMAGE, SAMPLE_LABEL

slicer = pytest.importorskip("slicer", reason="slicer-core is installed by the test set-up (./setup.sh test)")
vtk = pytest.importorskip("vtk")

from hybridmim.inference import Segmenter  # noqa: E402
from hybridmim.model_card import ModelCard  # noqa: E402
from hybridmim.model_store import resolve_model  # noqa: E402
from HybridMIMSegmentLib.finetuning import fine_tune  # noqa: E402
from HybridMIMSegmentLib.mrml_bridge import (  # noqa: E402
    image_from_volume_node,
    labelmap_array_from_segmentation,
    update_segmentation_node,
)
from HybridMIMSegmentLib.segmenting import is_corrected, model_output, segment, start_segment  # noqa: E402
from mrml_helpers import load_volume_node, reshape  # noqa: E402

MODEL = "hippocampus-cnn"


def labels_of(segmentation_node, volume_node) -> np.ndarray:
    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    return labelmap_array_from_segmentation(segmentation_node, ids, volume_node)


def transformed_volume(scene):
    """The sample, oblique, under a rotated and translated transform that is itself under another one."""
    volume = load_volume_node(scene, SAMPLE_IMAGE)
    reshape(volume)
    outer, inner = (scene.AddNewNodeByClass("vtkMRMLLinearTransformNode") for _ in range(2))
    for node, (shift, angle) in ((outer, ((12.0, -5.0, 3.0), 35.0)), (inner, ((-2.0, 4.0, 8.0), -15.0))):
        transform = vtk.vtkTransform()
        transform.Translate(*shift)
        transform.RotateY(angle)
        node.SetMatrixTransformToParent(transform.GetMatrix())
    inner.SetAndObserveTransformNodeID(outer.GetID())
    volume.SetAndObserveTransformNodeID(inner.GetID())
    return volume


def correct(segmentation_node, volume_node, card: ModelCard) -> np.ndarray:
    """What a user does in Segment Editor: erase a slab of the first structure, paint a blob of the second."""
    values = labels_of(segmentation_node, volume_node)
    k, j, i = np.nonzero(values == 1)
    slab = slice(int(np.median(k)) - 1, int(np.median(k)) + 2)
    values[slab][values[slab] == 1] = 0
    zz, yy, xx = np.ogrid[:values.shape[0], :values.shape[1], :values.shape[2]]
    values[(zz - 8) ** 2 + (yy - 10) ** 2 + (xx - 9) ** 2 <= 9] = 2
    edited = sitk.GetImageFromArray(values)
    edited.CopyInformation(image_from_volume_node(volume_node))
    update_segmentation_node(segmentation_node, edited, card.labels, volume_node, replace=True)
    return values


@pytest.mark.slow
def test_segment_correct_fine_tune_segment_never_loses_a_correction(scene):
    volume = transformed_volume(scene)
    first = segment(volume, MODEL, device="cpu")
    card = ModelCard.load(resolve_model(MODEL))
    engine = sitk.GetArrayFromImage(Segmenter(resolve_model(MODEL), "cpu").segment(image_from_volume_node(volume)))
    assert np.array_equal(labels_of(first, volume), engine)  # on the volume's voxels, whatever the transforms

    corrected = correct(first, volume, card)
    assert np.array_equal(labels_of(first, volume), corrected) and not np.array_equal(corrected, engine)
    assert np.array_equal(labels_of(model_output(first), volume), engine)  # what the edits are found against

    folder = fine_tune([first], model=MODEL, method="supervised", steps=3, device="cpu")
    assert resolve_model(MODEL) == folder and is_corrected(first)
    assert np.array_equal(labels_of(first, volume), corrected)  # fine-tuning only reads

    again = segment(volume, MODEL, device="cpu", segmentation_node=first)  # the user's output choice
    assert again is not first and again.GetScene() is scene
    assert np.array_equal(labels_of(first, volume), corrected)  # voxel for voxel
    new_engine = Segmenter(folder, "cpu").segment(image_from_volume_node(volume))
    assert np.array_equal(labels_of(again, volume), sitk.GetArrayFromImage(new_engine))
    assert again.GetTransformNodeID() == volume.GetTransformNodeID()


def test_uncertainty_map_lands_on_the_transformed_volume_and_is_reused(scene):
    """The map node has the volume's grid and parent transform and holds the engine's map; Segment again into
    the same segmentation refreshes the same node."""
    from vtk.util import numpy_support

    volume = transformed_volume(scene)
    task = start_segment(volume, MODEL, device="cpu", uncertainty_map=True)
    result = task.finish()
    node = task.uncertainty_node
    assert node is not None and node.GetTransformNodeID() == volume.GetTransformNodeID()
    a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(a)
    volume.GetIJKToRASMatrix(b)
    assert all(a.GetElement(r, c) == b.GetElement(r, c) for r in range(4) for c in range(4))
    dims = node.GetImageData().GetDimensions()
    values = numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars()).reshape(dims[::-1])
    engine = Segmenter(resolve_model(MODEL), "cpu").segment_with_uncertainty(image_from_volume_node(volume))[2]
    assert np.allclose(values, sitk.GetArrayFromImage(engine), atol=1e-6) and values.max() > 0.2
    again = start_segment(volume, MODEL, device="cpu", segmentation_node=result, uncertainty_map=True)
    again.finish()
    assert again.uncertainty_node is node


def test_a_segmentation_of_another_volume_is_not_rewritten(scene):
    volume = load_volume_node(scene, SAMPLE_IMAGE)
    result = segment(volume, MODEL, device="cpu")
    before = labels_of(result, volume)
    other = load_volume_node(scene, SAMPLE_IMAGE, "other volume")
    reshape(other, (5, 5, 5))
    task = start_segment(other, MODEL, device="cpu", segmentation_node=result)
    assert "belongs to volume" in task.note
    second = task.finish()
    assert second is not result
    assert np.array_equal(labels_of(result, volume), before)
    reference = result.GetNodeReference(result.GetReferenceImageGeometryReferenceRole())
    assert reference is volume


def test_an_uncorrected_result_of_the_same_volume_is_updated_in_place(scene):
    volume = load_volume_node(scene, SAMPLE_IMAGE)
    result = segment(volume, MODEL, device="cpu")
    ids = [result.GetSegmentation().GetNthSegmentID(i) for i in range(2)]
    assert segment(volume, MODEL, device="cpu", segmentation_node=result) is result
    assert [result.GetSegmentation().GetNthSegmentID(i) for i in range(2)] == ids


def test_cancelled_segment_leaves_the_scene_unchanged(scene):
    volume = load_volume_node(scene, SAMPLE_IMAGE)
    nodes = scene.GetNumberOfNodes()
    task = start_segment(volume, MODEL, device="cpu")
    task.cancel()
    assert task.wait(120)
    with pytest.raises(Exception, match="Cancelled"):
        task.apply()
    assert scene.GetNumberOfNodes() == nodes and not task.process.folder.exists()


def test_a_pretrained_only_model_is_refused_before_any_work(scene):
    volume = load_volume_node(scene, SAMPLE_IMAGE)
    with pytest.raises(Exception, match="pre-trained only"):
        start_segment(volume, "hybridmim-cnn-pretrained", device="cpu")


def assert_left_alone(volume, segmentation_node, why: str) -> None:
    """Segment into ``segmentation_node``: the result goes to a new node, for the reason given, and the chosen
    node keeps every voxel."""
    before = labels_of(segmentation_node, volume)
    task = start_segment(volume, MODEL, device="cpu", segmentation_node=segmentation_node)
    assert why in task.note
    assert task.finish() is not segmentation_node
    assert np.array_equal(labels_of(segmentation_node, volume), before)


def test_an_edited_result_is_not_overwritten_even_unchecked(scene):
    """Edits count as corrections whether or not the user checked the segmentation for fine-tuning."""
    volume = load_volume_node(scene, SAMPLE_IMAGE)
    result = segment(volume, MODEL, device="cpu")
    correct(result, volume, ModelCard.load(resolve_model(MODEL)))
    assert not is_corrected(result)
    assert_left_alone(volume, result, "edited after Segment wrote it")


def test_a_segmentation_drawn_by_the_user_is_not_overwritten(scene):
    volume = load_volume_node(scene, SAMPLE_IMAGE)
    drawn = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn by hand")
    card = ModelCard.load(resolve_model(MODEL))
    update_segmentation_node(drawn, sitk.ReadImage(str(SAMPLE_LABEL)), card.labels, volume)  # same names
    assert_left_alone(volume, drawn, "not made by Segment")


@pytest.mark.slow
def test_a_segmentation_checked_while_segment_runs_is_not_written_into(scene):
    from HybridMIMSegmentLib.segmenting import mark_corrected

    volume = load_volume_node(scene, SAMPLE_IMAGE)
    result = segment(volume, MODEL, device="cpu")
    before = labels_of(result, volume)
    task = start_segment(volume, MODEL, device="cpu", segmentation_node=result)
    assert task.note is None  # Segment's own, unedited result: it may be updated in place...
    mark_corrected(result)  # ...but the user checks it as corrected before the run ends
    assert task.finish() is not result and "corrections" in task.note
    assert np.array_equal(labels_of(result, volume), before)
