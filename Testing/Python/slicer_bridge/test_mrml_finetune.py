"""Fine-tuning from the scene, on real Slicer data objects (``slicer-core``: MRML scene, volume, segmentation and
plot nodes, Slicer's segmentation logic; no application, no Qt): corrected segmentations -> training pairs on the
volume's exact grid, the label-set decision, the live-plot nodes, the version list, and the engine run itself with
a tiny budget. The Qt widget is not exercised here (the module self-test does that inside Slicer)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import BUNDLED_MODEL, SAMPLE_IMAGE, SAMPLE_LABEL

slicer = pytest.importorskip("slicer", reason="slicer-core is installed by the test set-up (./setup.sh test)")
vtk = pytest.importorskip("vtk")

from hybridmim.methods import AUTOMATIC, METHOD_LABELS, METHODS  # noqa: E402
from hybridmim.model_card import Label, ModelCard  # noqa: E402
from HybridMIMSegmentLib.finetuning import (  # noqa: E402
    FineTuneInputError,
    FineTuneTask,
    LogRow,
    decide_label_set,
    describe_new_model,
    fine_tune_settings,
    gather_inputs,
    progress_message,
    reference_volume_node,
    training_pair,
    version_entries,
)
from HybridMIMSegmentLib.mrml_bridge import update_segmentation_node  # noqa: E402
from HybridMIMSegmentLib.plotting import ROLE_ATTRIBUTE, TrainingPlot  # noqa: E402
from mrml_helpers import load_volume_node, reshape  # noqa: E402

MODEL_LABELS = ["anterior hippocampus", "posterior hippocampus"]


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return ModelCard.load(BUNDLED_MODEL)


def corrected_segmentation(scene, volume_node, label_path, names, name="corrected"):
    """A segmentation as a user leaves it after correcting: one named segment per label value of ``label_path``
    (voxels on the volume's grid), imported by Slicer's segmentation logic, referencing its volume."""
    values = sitk.ReadImage(str(label_path))
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    update_segmentation_node(node, values, [Label(i + 1, n, [0.5, 0.5, 0.5]) for i, n in enumerate(names)],
                             volume_node)
    return node


def label_values(label_path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))


def node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())
            if not scene.GetNthNode(i).IsA("vtkMRMLSubjectHierarchyNode")}


def assert_on_volume_grid(image, label, volume_node):
    """Label and image carry exactly the volume node's grid (checked through the RAS matrix, in LPS)."""
    assert label.GetSize() == image.GetSize() == volume_node.GetImageData().GetDimensions()
    assert label.GetPixelID() == sitk.sitkUInt8
    assert label.GetOrigin() == image.GetOrigin() and label.GetSpacing() == image.GetSpacing()
    assert label.GetDirection() == image.GetDirection()
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    size = image.GetSize()
    for index in ([0, 0, 0], [size[0] - 1, 3, 2], [size[0] // 2, size[1] - 1, size[2] - 1]):
        ras = matrix.MultiplyPoint([*index, 1])[:3]
        assert np.allclose(label.TransformIndexToPhysicalPoint(index), [-ras[0], -ras[1], ras[2]], atol=1e-4)


# The method choices and defaults shown in the GUI are the engine's


def test_method_choices_are_the_engine_methods():
    assert tuple(METHOD_LABELS) == (AUTOMATIC, *METHODS)


def test_settings_are_checked_before_a_worker_starts():
    assert fine_tune_settings(None, 1.0, None, unlabeled=0).method == "supervised"
    assert fine_tune_settings(None, None, 3, labeled=1, unlabeled=2).method == "bcp"
    assert fine_tune_settings(AUTOMATIC, None, 3, labeled=3, unlabeled=2).method == "supervised"
    with pytest.raises(Exception, match="needs unlabelled volumes"):
        fine_tune_settings("bcp", 1.0, None, unlabeled=0)


# Which volume a segmentation belongs to


def test_reference_volume_is_the_node_reference(scene):
    volume = load_volume_node(scene, SAMPLE_IMAGE)
    load_volume_node(scene, SAMPLE_IMAGE, "same grid, other volume")
    segmentation = corrected_segmentation(scene, volume, SAMPLE_LABEL, MODEL_LABELS)
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is volume
    assert reference_volume_node(segmentation) is volume


def test_reference_volume_of_a_segmentation_file_is_found_by_its_grid(scene, shared_data, card):
    """A .seg.nrrd saved by Slicer and loaded back has no node reference: the volume on its grid is used, unless
    several volumes share that grid (then the user must say which)."""
    folder = shared_data / "unlabeled" / "slicer"
    load_volume_node(scene, SAMPLE_IMAGE)  # another grid: never a candidate
    volume = load_volume_node(scene, folder / "CTChest4.nrrd")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CTChest4 segmentation")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(folder / "CTChest4.seg.nrrd"))
    assert storage.ReadData(segmentation)
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is None
    assert reference_volume_node(segmentation) is volume

    inputs = gather_inputs([segmentation], [], card)
    assert inputs.label_set.new and inputs.label_set.structures[:2] == ["ribs", "cervical vertebral column"]
    image, label = inputs.labeled[0]
    assert_on_volume_grid(image, label, volume)
    assert set(np.unique(sitk.GetArrayViewFromImage(label))) == set(range(8))

    load_volume_node(scene, folder / "CTChest4.nrrd", "a second copy")
    assert reference_volume_node(segmentation) is None
    with pytest.raises(FineTuneInputError, match="Cannot tell which volume"):
        gather_inputs([segmentation], [], card)
    assert len(gather_inputs([(segmentation, volume)], [], card).labeled) == 1


# Training pairs: the volume's exact grid, values by structure name


@pytest.mark.parametrize("geometry", ["axis-aligned", "oblique-anisotropic"])
def test_training_pair_is_on_the_volume_grid_with_values_by_name(scene, geometry):
    volume = load_volume_node(scene, SAMPLE_IMAGE)
    if geometry != "axis-aligned":
        reshape(volume, spacing=(0.7, 1.3, 2.5))
    segmentation = corrected_segmentation(scene, volume, SAMPLE_LABEL, MODEL_LABELS)
    before = node_ids(scene)
    image, label = training_pair(segmentation, volume, MODEL_LABELS)
    assert node_ids(scene) == before
    assert_on_volume_grid(image, label, volume)
    assert np.array_equal(sitk.GetArrayViewFromImage(label), label_values(SAMPLE_LABEL))
    assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayFromImage(sitk.ReadImage(
        str(SAMPLE_IMAGE))))

    swapped = sitk.GetArrayFromImage(training_pair(segmentation, volume, MODEL_LABELS[::-1])[1])
    original = label_values(SAMPLE_LABEL)
    assert np.array_equal(swapped == 1, original == 2) and np.array_equal(swapped == 2, original == 1)


def test_training_pair_of_a_large_oblique_mri(scene, shared_data):
    """A left-atrium LGE-MRI (183 x 140 x 88) made oblique and anisotropic: every voxel of the label kept."""
    case = sorted((shared_data / "la" / "imagesTr").glob("*.nii.gz"))[0]
    volume = load_volume_node(scene, case)
    reshape(volume, (-30, 20, 5), spacing=(0.625, 0.9, 2.0))
    label_path = shared_data / "la" / "labelsTr" / case.name
    segmentation = corrected_segmentation(scene, volume, label_path, ["left atrium"])
    image, label = training_pair(segmentation, volume, ["left atrium"])
    assert_on_volume_grid(image, label, volume)
    assert np.array_equal(sitk.GetArrayViewFromImage(label), label_values(label_path))


# The label-set decision


def test_label_set_same_names_in_another_order_keeps_the_model_labels():
    label_set = decide_label_set([("a", MODEL_LABELS[::-1]), ("b", MODEL_LABELS)], MODEL_LABELS)
    assert label_set.structures == MODEL_LABELS and label_set.label_names is None and not label_set.new


def test_label_set_other_names_is_a_new_label_set_in_the_first_order():
    label_set = decide_label_set([("a", ["tail", "head"]), ("b", ["head", "tail"])], MODEL_LABELS)
    assert label_set.new and label_set.structures == label_set.label_names == ["tail", "head"]
    assert decide_label_set([("a", MODEL_LABELS[:1])], MODEL_LABELS).label_names == MODEL_LABELS[:1]


@pytest.mark.parametrize(("named", "message"), [
    ([("a", MODEL_LABELS), ("b", [MODEL_LABELS[0], "tail"])],
     "Segmentation 'b' has 'tail', which 'a' lacks and lacks 'posterior hippocampus'"),
    ([("a", MODEL_LABELS), ("b", MODEL_LABELS[:1])], "Segmentation 'b' lacks 'posterior hippocampus'"),
    ([("a", [])], "Segmentation 'a' has no segments"),
    ([("a", ["x", "x"])], "more than one segment named 'x'"),
    ([], "Check at least one"),
])
def test_label_set_errors_say_what_differs(named, message):
    with pytest.raises(FineTuneInputError, match=message):
        decide_label_set(named, MODEL_LABELS)


def test_gather_matches_segments_to_model_labels_by_name(scene, card, shared_data):
    """Two corrected volumes, one with its segments in the other order: values follow the model's labels."""
    first = load_volume_node(scene, SAMPLE_IMAGE)
    reshape(first)
    second_path = shared_data / "hippocampus" / "imagesTr" / "hippocampus_004.nii.gz"
    second_label = shared_data / "hippocampus" / "labelsTr" / "hippocampus_004.nii.gz"
    second = load_volume_node(scene, second_path)
    unlabeled = load_volume_node(scene, shared_data / "hippocampus" / "imagesTr" / "hippocampus_006.nii.gz")
    a = corrected_segmentation(scene, first, SAMPLE_LABEL, MODEL_LABELS, "a")
    b = corrected_segmentation(scene, second, second_label, MODEL_LABELS, "b")
    b.GetSegmentation().SetSegmentIndex(b.GetSegmentation().GetSegmentIdBySegmentName(MODEL_LABELS[1]), 0)
    assert [b.GetSegmentation().GetNthSegment(i).GetName() for i in range(2)] == MODEL_LABELS[::-1]
    before = node_ids(scene)

    inputs = gather_inputs([a, (b, second)], [unlabeled, first, unlabeled], card)
    assert node_ids(scene) == before
    assert inputs.label_set.label_names is None and inputs.label_set.structures == MODEL_LABELS
    assert np.array_equal(sitk.GetArrayViewFromImage(inputs.labeled[0][1]), label_values(SAMPLE_LABEL))
    assert np.array_equal(sitk.GetArrayViewFromImage(inputs.labeled[1][1]), label_values(second_label))
    assert_on_volume_grid(*inputs.labeled[0], first)
    assert len(inputs.unlabeled) == 1 and inputs.unlabeled[0].GetSize() == unlabeled.GetImageData().GetDimensions()
    assert any("not also used as unlabelled" in note for note in inputs.notes)
    assert inputs.sources == ["a on hippocampus_017.nii.gz", "b on hippocampus_004.nii.gz"]
    assert "2 corrected segmentation(s) (anterior hippocampus, posterior hippocampus), 1 unlabelled" in \
        inputs.summary()


def test_gather_with_other_names_is_a_new_label_set(scene, card):
    volume = load_volume_node(scene, SAMPLE_IMAGE)
    segmentation = corrected_segmentation(scene, volume, SAMPLE_LABEL, ["head", "tail"])
    inputs = gather_inputs([segmentation], [], card)
    assert inputs.label_set.label_names == ["head", "tail"]
    assert any("new model" in note for note in inputs.notes)
    assert np.array_equal(sitk.GetArrayViewFromImage(inputs.labeled[0][1]), label_values(SAMPLE_LABEL))


def test_the_question_before_a_new_label_set_is_the_engines_plan(scene, card):
    volume = load_volume_node(scene, SAMPLE_IMAGE)
    inputs = gather_inputs([corrected_segmentation(scene, volume, SAMPLE_LABEL, ["head", "tail"])], [], card)
    question = describe_new_model(inputs, "hippocampus-cnn")
    assert "name 'head', 'tail', not the labels of 'hippocampus-cnn'" in question
    assert "A new model 'hippocampus-cnn-head-tail'" in question and "from 'hippocampus-cnn' 2.0.0" in question


def test_gather_refuses_mismatching_segmentations(scene, card):
    volume = load_volume_node(scene, SAMPLE_IMAGE)
    a = corrected_segmentation(scene, volume, SAMPLE_LABEL, MODEL_LABELS, "a")
    b = corrected_segmentation(scene, volume, SAMPLE_LABEL, [MODEL_LABELS[0], "tail"], "b")
    with pytest.raises(FineTuneInputError, match="'b' has 'tail', which 'a' lacks"):
        gather_inputs([a, b], [], card)


def test_gather_refuses_empty_segmentations(scene, card):
    volume = load_volume_node(scene, SAMPLE_IMAGE)
    no_segments = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "no segments")
    no_segments.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    with pytest.raises(FineTuneInputError, match="'no segments' has no segments"):
        gather_inputs([no_segments], [], card)

    blank = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "blank")
    blank.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for name in MODEL_LABELS:
        blank.GetSegmentation().AddEmptySegment("", name)
    with pytest.raises(FineTuneInputError, match="'blank' is empty on volume"):
        gather_inputs([blank], [], card)

    painted = corrected_segmentation(scene, volume, SAMPLE_LABEL, MODEL_LABELS, "painted")
    with pytest.raises(FineTuneInputError, match="'blank' is empty"):
        gather_inputs([painted, blank], [], card)
    with pytest.raises(FineTuneInputError, match="Check at least one"):
        gather_inputs([], [volume], card)


def test_a_segment_empty_everywhere_is_refused_and_empty_somewhere_is_noted(scene, card):
    volume = load_volume_node(scene, SAMPLE_IMAGE)
    anterior_only = sitk.ReadImage(str(SAMPLE_LABEL))
    anterior_only = sitk.Cast(anterior_only == 1, sitk.sitkUInt8)

    def segmentation_with_empty_posterior(name):
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        update_segmentation_node(node, anterior_only, [Label(1, MODEL_LABELS[0], [1, 0, 0])], volume)
        node.GetSegmentation().AddEmptySegment("", MODEL_LABELS[1])
        return node

    first = segmentation_with_empty_posterior("only anterior")
    with pytest.raises(FineTuneInputError, match="'posterior hippocampus' are empty in every corrected"):
        gather_inputs([first], [], card)
    full = corrected_segmentation(scene, volume, SAMPLE_LABEL, MODEL_LABELS, "full")
    inputs = gather_inputs([full, first], [], card)
    assert any("'posterior hippocampus' empty in 'only anterior'" in note for note in inputs.notes)
    assert set(np.unique(sitk.GetArrayViewFromImage(inputs.labeled[1][1]))) == {0, 1}


def test_held_out_segmentations_become_validation_pairs(scene, card):
    volume = load_volume_node(scene, SAMPLE_IMAGE)
    a = corrected_segmentation(scene, volume, SAMPLE_LABEL, MODEL_LABELS, "a")
    b = corrected_segmentation(scene, volume, SAMPLE_LABEL, MODEL_LABELS, "b")
    inputs = gather_inputs([a], [], card, validation=[b])
    assert len(inputs.labeled) == 1 and len(inputs.validation) == 1
    assert "1 held out to measure Dice" in inputs.summary()


# Progress log and the live plot


def test_log_rows_from_worker_records_and_progress_message():
    records = [{"event": "step", "step": 1, "fraction": 0.25, "seconds": 30.0,
                "losses": {"supervised": 0.5, "unlabeled": 0.25}, "learning_rate": 1e-3, "validation_dice": None},
               {"event": "step", "step": 2, "fraction": 0.5, "seconds": 60.0, "losses": {"supervised": 0.25},
                "learning_rate": 1e-3, "validation_dice": 0.8}]
    first, row = (LogRow.from_record(r) for r in records)
    assert first.loss == 0.75 and first.validation_dice is None and row.step == 2
    assert progress_message(row) == "Step 2: loss 0.250, validation Dice 0.800; 1:00 spent, about 1:00 left"


def test_training_plot_nodes_are_hidden_unsaved_and_reused(scene):
    plot = TrainingPlot(scene)
    view = plot.view_node()
    chart = scene.GetNodeByID(view.GetPlotChartNodeID())
    assert chart.GetNumberOfPlotSeriesNodes() == 3
    made = node_ids(scene)
    assert len(made) == 7
    for node_id in made:
        node = scene.GetNodeByID(node_id)
        assert node.GetHideFromEditors() and not node.GetSaveWithScene() and node.GetAttribute(ROLE_ATTRIBUTE)

    rows = [LogRow(step, step * 2.0, step / 30, 1.0 / step, {"supervised": 1.0 / step}, 1e-3,
                   0.5 + step / 100 if step % 10 == 0 else None) for step in range(1, 31)]
    plot.append(rows[:12])
    again = TrainingPlot(scene)  # a new widget finds the same nodes
    again.append(rows[12:])
    assert again.view_node() is view and node_ids(scene) == made
    loss_table = scene.GetNodeByID(chart.GetNthPlotSeriesNode(0).GetTableNodeID())
    assert loss_table.GetNumberOfRows() == 30
    steps = loss_table.GetTable().GetColumnByName("step")
    assert [steps.GetValue(i) for i in range(30)] == list(range(1, 31))
    smoothed = loss_table.GetTable().GetColumnByName("smoothed loss")
    assert np.isclose(smoothed.GetValue(29), np.mean([1.0 / s for s in range(11, 31)]))
    dice_table = scene.GetNodeByID(chart.GetNthPlotSeriesNode(2).GetTableNodeID())
    assert dice_table.GetNumberOfRows() == 3
    assert dice_table.GetTable().GetColumnByName("validation Dice").GetValue(2) == pytest.approx(0.8)

    again.reset()
    assert loss_table.GetNumberOfRows() == 0 and dice_table.GetNumberOfRows() == 0
    scene.Clear(0)  # a closed scene: the next run makes them again
    assert TrainingPlot(scene).view_node() is not None and len(node_ids(scene)) == 7
    TrainingPlot(scene).remove()
    assert not node_ids(scene)


# Versions


def make_version(version: str, parent: str | None = None) -> None:
    """A user version of the bundled model (its weights copied; only the card differs)."""
    from hybridmim.model_store import user_models_dir

    folder = user_models_dir() / f"hippocampus-cnn-{version}"
    shutil.copytree(BUNDLED_MODEL, folder)
    card = json.loads((folder / "card.json").read_text(encoding="utf-8"))
    card["version"] = version
    if parent:
        card["training"] = {"parent": {"id": "hippocampus-cnn", "version": parent}, "method": "bcp", "steps": 300,
                            "time_seconds": 125.0, "hardware": "CPU", "labeled_volumes": 2, "unlabeled_volumes": 4}
        card["metrics"] = {"dice": {"anterior hippocampus": 0.9, "mean": 0.89}}
    (folder / "card.json").write_text(json.dumps(card), encoding="utf-8")


def test_version_entries_follow_the_active_version():
    from hybridmim.model_store import set_active_version

    make_version("2.0.0-ft.1", parent="2.0.0")
    make_version("2.0.0-ft.2", parent="2.0.0-ft.1")
    entries = version_entries("hippocampus-cnn")
    assert [e.version for e in entries] == ["2.0.0", "2.0.0-ft.1", "2.0.0-ft.2"]
    assert [e.active for e in entries] == [False, False, True]
    assert entries[0].text == "2.0.0 (bundled)" and entries[2].text == "2.0.0-ft.2 (fine-tuned) - active"
    assert "Fine-tuned from hippocampus-cnn 2.0.0-ft.1 with bcp: 300 steps, 2:05" in entries[2].tooltip
    assert "Dice: anterior hippocampus 0.900, mean 0.890" in entries[2].tooltip
    assert "Dice: anterior hippocampus 0.882" in entries[0].tooltip

    set_active_version("hippocampus-cnn", "2.0.0")  # revert
    assert [e.active for e in version_entries("hippocampus-cnn")] == [True, False, False]
    assert version_entries("no-such-model") == []


# The run itself: the engine, off the scene, with a tiny budget


def test_fine_tune_task_writes_a_new_active_version(scene, card, shared_data):
    """Real segmentation nodes -> engine, semi-supervised, 3 steps, one held-out segmentation for Dice."""
    from hybridmim.model_store import model_versions, resolve_model

    volume = load_volume_node(scene, SAMPLE_IMAGE)
    reshape(volume)
    corrected = corrected_segmentation(scene, volume, SAMPLE_LABEL, MODEL_LABELS)
    other = load_volume_node(scene, shared_data / "hippocampus" / "imagesTr" / "hippocampus_004.nii.gz")
    held_out = corrected_segmentation(scene, other, shared_data / "hippocampus" / "labelsTr" /
                                      "hippocampus_004.nii.gz", MODEL_LABELS, "held out")
    unlabeled = load_volume_node(scene, shared_data / "hippocampus" / "imagesTr" / "hippocampus_006.nii.gz")
    inputs = gather_inputs([corrected], [unlabeled], card, validation=[held_out])
    before = node_ids(scene)
    task = FineTuneTask(inputs, BUNDLED_MODEL, fine_tune_settings("mean-teacher", None, 3, unlabeled=1), "cpu")
    messages = []
    folder = task.finish(lambda row: messages.append(progress_message(row)))

    assert node_ids(scene) == before and not task.process.folder.exists()
    assert resolve_model("hippocampus-cnn") == folder and model_versions("hippocampus-cnn")[-1].path == folder
    new = ModelCard.load(folder)
    assert new.version == "2.0.0-ft.1" and new.training["parent"]["version"] == "2.0.0"
    assert new.training["method"] == "mean-teacher" and new.training["steps"] == 3
    assert "dice" in new.metrics
    rows = task.rows
    assert [r.step for r in rows] == [1, 2, 3] and "unlabeled" in rows[-1].losses
    assert rows[-1].validation_dice is not None
    assert any(message.startswith("Step 3: loss") for message in messages)
    assert version_entries("hippocampus-cnn")[-1].active


@pytest.mark.slow
def test_fine_tune_task_with_new_names_makes_a_new_model(scene, card):
    """A segment name may look like an option ('-...'): it still reaches the engine as a name."""
    volume = load_volume_node(scene, SAMPLE_IMAGE)
    whole = sitk.Cast(sitk.ReadImage(str(SAMPLE_LABEL)) > 0, sitk.sitkUInt8)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "whole")
    update_segmentation_node(segmentation, whole, [Label(1, "-hippocampus", [1, 1, 0])], volume)
    inputs = gather_inputs([segmentation], [], card)
    task = FineTuneTask(inputs, BUNDLED_MODEL, fine_tune_settings(None, None, 1), "cpu")
    assert task.wait(300) and task.error is None, task.error
    new = ModelCard.load(task.result)
    assert new.id == "hippocampus-cnn-hippocampus" and [label.name for label in new.labels] == ["-hippocampus"]


@pytest.mark.slow
def test_cancelled_fine_tune_writes_nothing(scene, card):
    from hybridmim.errors import Cancelled
    from hybridmim.model_store import user_models_dir

    volume = load_volume_node(scene, SAMPLE_IMAGE)
    segmentation = corrected_segmentation(scene, volume, SAMPLE_LABEL, MODEL_LABELS)
    inputs = gather_inputs([segmentation], [], card)
    task = FineTuneTask(inputs, BUNDLED_MODEL, fine_tune_settings(None, None, 10_000), "cpu")
    while not task.rows and not task.done:
        task.wait(0.05)
    task.cancel()
    assert task.wait(120)
    assert isinstance(task.error, Cancelled) and task.result is None
    assert not task.process.running and not task.process.folder.exists()
    folder = user_models_dir()
    assert not folder.exists() or not list(folder.iterdir())  # not even a hidden staging folder


def test_only_the_slices_edited_after_segment_are_learned_from(scene, card, tmp_path):
    """Segment keeps a hidden copy of what it wrote; a segmentation marked 'only the slices I edited' becomes a
    label map with the edited slices and the rest unreviewed (under a parent transform too); the choice is kept
    per segmentation, and one not made by Segment is refused with what to do."""
    from hybridmim.partial import UNREVIEWED
    from HybridMIMSegmentLib.finetuning import edited_slices_only, set_edited_slices_only
    from HybridMIMSegmentLib.segmenting import keep_model_output, model_output

    volume = load_volume_node(scene, SAMPLE_IMAGE)
    reshape(volume)
    truth = label_values(SAMPLE_LABEL)
    missed = truth.copy()
    missed[[10, 15]] = 0  # the model missed these two slices ...
    model_path = tmp_path / "model-output.nii.gz"
    image = sitk.GetImageFromArray(missed)
    image.CopyInformation(sitk.ReadImage(str(SAMPLE_LABEL)))
    sitk.WriteImage(image, str(model_path))
    node = corrected_segmentation(scene, volume, model_path, MODEL_LABELS, "segmented")
    keep_model_output(node)
    copy = model_output(node)
    assert copy is not None and copy.GetHideFromEditors()
    # ... and the user painted them in
    update_segmentation_node(node, sitk.ReadImage(str(SAMPLE_LABEL)), [Label(i + 1, n, [0.5, 0.5, 0.5])
                                                                       for i, n in enumerate(MODEL_LABELS)], volume)
    assert not edited_slices_only(node)
    set_edited_slices_only(node, True)
    assert edited_slices_only(node)

    inputs = gather_inputs([node], [], card)
    labels = sitk.GetArrayFromImage(inputs.labeled[0][1])
    assert np.array_equal(labels[[10, 15]], truth[[10, 15]])
    assert bool((np.delete(labels, [10, 15], axis=0) == UNREVIEWED).all())
    assert any("the 2 of 32 slices you edited" in note for note in inputs.notes)

    drawn = corrected_segmentation(scene, volume, SAMPLE_LABEL, MODEL_LABELS, "drawn by hand")
    set_edited_slices_only(drawn, True)
    with pytest.raises(FineTuneInputError, match="it was not made by Segment"):
        gather_inputs([drawn], [], card)
    copy.GetSegmentation().RemoveAllSegments()  # a plain scene save keeps the hidden node but not its data
    with pytest.raises(FineTuneInputError, match="not saved with the scene"):
        gather_inputs([node], [], card)


def test_a_deleted_segmentation_takes_its_hidden_model_output_along(scene):
    from HybridMIMSegmentLib.segmenting import keep_model_output, model_output, remove_orphaned_model_outputs

    volume = load_volume_node(scene, SAMPLE_IMAGE)
    kept, deleted = (corrected_segmentation(scene, volume, SAMPLE_LABEL, MODEL_LABELS, name)
                     for name in ("kept", "deleted"))
    for node in (kept, deleted):
        keep_model_output(node)
    kept_copy, deleted_copy = model_output(kept), model_output(deleted)
    assert remove_orphaned_model_outputs(scene) == 0
    scene.RemoveNode(deleted)
    assert remove_orphaned_model_outputs(scene) == 1
    assert scene.GetNodeByID(deleted_copy.GetID()) is None
    assert scene.GetNodeByID(kept_copy.GetID()) is kept_copy and model_output(kept) is kept_copy
    assert scene.GetNodeByID(kept.GetID()) is kept and scene.GetNodeByID(volume.GetID()) is volume
