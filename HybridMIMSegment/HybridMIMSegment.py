"""HybridMIMSegment Slicer module: wiring only. The engine (``hybridmim``) does the work; ``HybridMIMSegmentLib``
bridges MRML and runs it off the GUI thread."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

DEFAULT_MODEL = "hippocampus-cnn"
MODULE_DIR = Path(__file__).resolve().parent


def resourceFile(*parts: str) -> Path:
    """A shared resource (bundled models, samples): in the installed module or in the source tree."""
    for root in (MODULE_DIR / "Resources", MODULE_DIR.parent / "Resources"):
        if (root.joinpath(*parts)).exists():
            return root.joinpath(*parts)
    raise FileNotFoundError(os.path.join(*parts))


#
# HybridMIMSegment
#


class HybridMIMSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("HybridMIM Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["HybridMIMSegment developers"]
        self.parent.helpText = _(
            "Segments a CT or MRI volume with a bundled 3D network (CNN or SwinUNETR). Pick the volume and a model, "
            "click Segment; the result is a segmentation with named, coloured segments on the volume's exact grid. "
            "Runs in the background (Cancel leaves the scene unchanged); uses the GPU when there is one. "
            "Models are bundled: nothing is downloaded. Research use only, not for diagnosis. "
            '<a href="https://github.com/HybridMIMSegment/HybridMIMSegment#readme">Documentation</a>.')
        self.parent.acknowledgementText = _(
            "Networks from MONAI; method: Xing et al., HybridMIM, IEEE JBHI 2024. The bundled hippocampus model was "
            "trained on the Medical Segmentation Decathlon Task04 data (CC-BY-SA 4.0).")


#
# Parameter node
#


@parameterNodeWrapper
class HybridMIMSegmentParameterNode:
    """inputVolume: volume to segment. model: id or folder of the model (bundled or user). device: auto (GPU when
    present), cuda, cpu. outputSegmentation: where results go (a new node when empty). replaceSegments: overwrite
    segments of the same name instead of adding new ones."""

    inputVolume: vtkMRMLScalarVolumeNode
    model: str = DEFAULT_MODEL
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    outputSegmentation: vtkMRMLSegmentationNode
    replaceSegments: bool = True


#
# Widget
#


class HybridMIMSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._task = None
        self._taskInputs = None
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._pollTask)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/HybridMIMSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = HybridMIMSegmentLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.refreshModels)
        self.ui.openModelsFolderButton.connect("clicked(bool)", self.onOpenModelsFolder)
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.hide()
        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.onCancel()
        self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.onCancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._selectModelInCombobox(self._parameterNode.model)
            self._updateButtons()

    # Models

    def refreshModels(self) -> None:
        """Fill the selector with bundled and user models; each item's tooltip is its card summary."""
        selected = self._parameterNode.model if self._parameterNode else DEFAULT_MODEL
        self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        for model in self.logic.models():
            card = model.card
            origin = _("bundled") if model.bundled else _("user")
            self.ui.modelSelector.addItem(f"{card.name} — v{card.version} ({origin})", str(model.path))
            self.ui.modelSelector.setItemData(self.ui.modelSelector.count - 1, modelSummary(card), qt.Qt.ToolTipRole)
        self.ui.modelSelector.blockSignals(False)
        self.ui.userModelsFolderLabel.text = str(self.logic.userModelsFolder())
        self._selectModelInCombobox(selected)

    def _selectModelInCombobox(self, model: str) -> None:
        """Select ``model`` (a folder, or an id: its newest version)."""
        try:
            folder = str(self.logic.resolveModel(model))
        except Exception:
            folder = None
        index = self.ui.modelSelector.findData(folder) if folder else -1
        if index >= 0:
            self.ui.modelSelector.currentIndex = index
        self.onModelSelected(self.ui.modelSelector.currentIndex)

    def onModelSelected(self, index: int) -> None:
        folder = self.ui.modelSelector.itemData(index) if index >= 0 else None
        self.ui.modelInfoLabel.text = modelSummary(self.logic.cardOfFolder(folder)) if folder else _("No model found")
        if folder and self._parameterNode:
            self._parameterNode.model = folder
        self._updateButtons()

    def onOpenModelsFolder(self) -> None:
        folder = self.logic.userModelsFolder()
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    # Segment / Cancel

    def _updateButtons(self, caller=None, event=None) -> None:
        running = self._task is not None
        ready = bool(self._parameterNode and self._parameterNode.inputVolume and self.ui.modelSelector.count)
        self.ui.segmentButton.enabled = ready and not running
        self.ui.segmentButton.toolTip = _("Segment the input volume") if ready else \
            _("Select an input volume and a model")
        self.ui.cancelButton.enabled = running

    def onSegment(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Segmentation failed to start."), waitCursor=True):
            if not self.logic.setupDependencies(ask=True):
                self.ui.statusLabel.text = _("Python packages are missing; nothing was done.")
                return
            p = self._parameterNode
            self._taskInputs = (p.inputVolume, p.outputSegmentation, p.replaceSegments)
            self._task = self.logic.segment(p.inputVolume, model=p.model, device=p.device,
                                            segmentationNode=p.outputSegmentation, replace=p.replaceSegments,
                                            wait=False)
            self.ui.progressBar.value = 0
            self.ui.progressBar.show()
            self.ui.statusLabel.text = _("Starting...")
            self._timer.start()
            self._updateButtons()

    def onCancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self.ui.statusLabel.text = _("Cancelling...")

    def _pollTask(self) -> None:
        task = self._task
        if task is None:
            self._timer.stop()
            return
        self.ui.progressBar.value = int(100 * task.fraction)
        self.ui.statusLabel.text = task.message
        if not task.done:
            return
        self._timer.stop()
        self._task = None
        self.ui.progressBar.hide()
        volumeNode, segmentationNode, replace = self._taskInputs
        from hybridmim.errors import Cancelled

        if isinstance(task.error, Cancelled):
            self.ui.statusLabel.text = _("Cancelled; the scene was not changed.")
        elif task.error is not None:
            self.ui.statusLabel.text = _("Failed: {error}").format(error=task.error)
            slicer.util.errorDisplay(_("Segmentation failed: {error}").format(error=task.error))
            logging.error("Segmentation failed", exc_info=task.error)
        else:
            with slicer.util.tryWithErrorDisplay(_("Could not store the result."), waitCursor=True):
                labelmap, card = task.result
                node = self.logic.applyResult(volumeNode, labelmap, card, segmentationNode, replace)
                self._parameterNode.outputSegmentation = node
                self.ui.statusLabel.text = _("Done: {n} segments in '{name}'.").format(
                    n=len(card.labels), name=node.GetName())
        self._updateButtons()


def modelSummary(card) -> str:
    if card is None:
        return ""
    dice = card.metrics.get("dice", {})
    diceText = ", ".join(f"{name} {value:.2f}" for name, value in dice.items()) or _("not measured")
    return (f"{card.name}\n{_('Modality')}: {card.modality}; {_('structures')}: "
            f"{', '.join(label.name for label in card.labels)}\n{_('Validation Dice')}: {diceText}\n"
            f"{_('Licence')}: {card.licence}\n{card.intended_use}")


#
# Logic
#


class HybridMIMSegmentLogic(ScriptedLoadableModuleLogic):
    """Scripting API. Example::

        logic = slicer.util.getModuleLogic("HybridMIMSegment")  # or HybridMIMSegmentLogic()
        segmentationNode = logic.segment(volumeNode, model="hippocampus-cnn", device="auto", wait=True)
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._segmenters = {}

    def getParameterNode(self):
        return HybridMIMSegmentParameterNode(super().getParameterNode())

    @staticmethod
    def setupDependencies(ask: bool = True) -> bool:
        from HybridMIMSegmentLib.dependencies import ensure_dependencies

        return ensure_dependencies(ask)

    @staticmethod
    def models():
        from hybridmim.model_store import list_models

        return list_models()

    @staticmethod
    def userModelsFolder() -> Path:
        from hybridmim.model_store import user_models_dir

        return user_models_dir()

    @staticmethod
    def cardOfFolder(folder):
        from hybridmim.model_card import ModelCard

        return ModelCard.load(Path(folder)) if folder else None

    @staticmethod
    def resolveModel(model: str) -> Path:
        """Folder of a model id (its newest version) or of a model folder path."""
        from hybridmim.model_store import resolve_model

        return resolve_model(model)

    def segment(self, volumeNode, model: str = DEFAULT_MODEL, device: str = "auto", segmentationNode=None,
                replace: bool = True, wait: bool = True, progress=None):
        """Segment ``volumeNode``. With ``wait`` (scripts, tests) returns the segmentation node; otherwise starts a
        background task and returns it (``task.result`` is ``(labelmap, card)``; pass it to ``applyResult`` on the
        main thread). The scene is changed only when the result is applied."""
        from hybridmim.progress import CancelToken, no_progress
        from HybridMIMSegmentLib.background import BackgroundTask
        from HybridMIMSegmentLib.mrml_bridge import image_from_volume_node

        image = image_from_volume_node(volumeNode)

        def work(report, cancel):
            segmenter = self._segmenter(model, device)
            return segmenter.segment(image, report, cancel), segmenter.card

        if not wait:
            return BackgroundTask(work).start()
        labelmap, card = work(progress or no_progress, CancelToken())
        return self.applyResult(volumeNode, labelmap, card, segmentationNode, replace)

    def _segmenter(self, model: str, device: str):
        from hybridmim.inference import Segmenter

        key = (str(self.resolveModel(model)), device)
        if key not in self._segmenters:
            self._segmenters.clear()  # keep one model in memory
            self._segmenters[key] = Segmenter(key[0], device)
        return self._segmenters[key]

    @staticmethod
    def applyResult(volumeNode, labelmap, card, segmentationNode=None, replace: bool = True):
        """Main thread only: write the labelmap into a (new) segmentation node referencing ``volumeNode``."""
        from HybridMIMSegmentLib.mrml_bridge import update_segmentation_node

        scene = volumeNode.GetScene()
        created = segmentationNode is None
        if created:
            segmentationNode = scene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", scene.GenerateUniqueName(f"{volumeNode.GetName()} {card.id}"))
            segmentationNode.CreateDefaultDisplayNodes()
        try:
            update_segmentation_node(segmentationNode, labelmap, card.labels, volumeNode, replace)
        except Exception:
            if created:
                scene.RemoveNode(segmentationNode)
            raise
        return segmentationNode


#
# Test
#


class HybridMIMSegmentTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (self-test, ``Testing/Slicer/run_selftest.py``): real sample, real model, real MRML."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_sample_reaches_card_dice()
        self.setUp()
        self.test_oblique_volume_gets_the_same_voxels()
        self.setUp()
        self.test_cancel_leaves_scene_unchanged()

    def _loadSample(self):
        volume = slicer.util.loadVolume(str(resourceFile("Samples", "hippocampus_017.nii.gz")))
        reference = slicer.util.loadLabelVolume(str(resourceFile("Samples", "hippocampus_017.label.nii.gz")))
        return volume, reference

    def test_segment_sample_reaches_card_dice(self):
        import numpy as np

        from hybridmim.metrics import dice_per_label
        from HybridMIMSegmentLib.mrml_bridge import labelmap_array_from_segmentation

        self.delayDisplay("Segmenting the sample")
        logic = HybridMIMSegmentLogic()
        self.assertTrue(logic.setupDependencies(ask=False))
        volume, reference = self._loadSample()
        segmentation = logic.segment(volume, model=DEFAULT_MODEL, device="auto", wait=True)
        card = logic.cardOfFolder(logic.resolveModel(DEFAULT_MODEL))
        names = [segmentation.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
        self.assertEqual(names, [label.name for label in card.labels])
        ids = [segmentation.GetSegmentation().GetNthSegmentID(i) for i in range(len(names))]
        labels = labelmap_array_from_segmentation(segmentation, ids, volume)
        dice = dice_per_label(labels, slicer.util.arrayFromVolume(reference), [1, 2])
        self.assertGreaterEqual(float(np.mean(list(dice.values()))), card.metrics["dice"]["mean"] - 0.05)
        self.delayDisplay(f"Dice {dice}")

    def test_oblique_volume_gets_the_same_voxels(self):
        import numpy as np

        from HybridMIMSegmentLib.mrml_bridge import labelmap_array_from_segmentation

        logic = HybridMIMSegmentLogic()
        volume, _reference = self._loadSample()
        straight = logic.segment(volume, wait=True)
        ids = [straight.GetSegmentation().GetNthSegmentID(i) for i in range(2)]
        expected = labelmap_array_from_segmentation(straight, ids, volume)

        matrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrix)
        rotation = vtk.vtkTransform()
        rotation.RotateZ(25)
        rotation.RotateX(-15)
        rotated = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Multiply4x4(rotation.GetMatrix(), matrix, rotated)
        volume.SetIJKToRASMatrix(rotated)
        oblique = logic.segment(volume, wait=True)
        ids = [oblique.GetSegmentation().GetNthSegmentID(i) for i in range(2)]
        self.assertTrue(np.array_equal(labelmap_array_from_segmentation(oblique, ids, volume), expected))

    def test_cancel_leaves_scene_unchanged(self):
        from hybridmim.errors import Cancelled

        logic = HybridMIMSegmentLogic()
        volume, _reference = self._loadSample()
        before = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
        task = logic.segment(volume, wait=False)
        task.cancel()
        task.wait()
        if task.error is None:  # finished before the cancel landed: the result must still not be in the scene
            self.assertIsNotNone(task.result)
        else:
            self.assertIsInstance(task.error, Cancelled)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), before)
