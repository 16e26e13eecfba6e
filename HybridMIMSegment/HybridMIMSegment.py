"""HybridMIMSegment Slicer module: wiring only. The engine (``hybridmim``) does the work in a worker process
(``hybridmim`` command line tool, run by ``PythonSlicer``); ``HybridMIMSegmentLib`` moves volumes and
segmentations between MRML and that process. Slicer's own process never imports torch or MONAI."""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from hybridmim.methods import AUTOMATIC, METHOD_LABELS, METHOD_TOOLTIPS
from hybridmim.model_store import DEFAULT_MODEL
from hybridmim.settings import DEFAULT_MINUTES

MODULE_DIR = Path(__file__).resolve().parent
DEVICES = ["auto", "cuda", "mps", "cpu"]
SAMPLE_NAME = "HybridMIMHippocampus"


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
            "click Segment; the result is a segmentation with named, coloured segments on the volume's exact grid "
            "(also under a parent transform). The network runs in a separate process (progress shown; Cancel "
            "stops it and leaves the scene unchanged); it uses the GPU when there is one. "
            "<br><b>Fine-tune</b>: correct a few results in Segment Editor, check them (and any unlabelled volumes) "
            "in the Fine-tune section, pick a method and a time budget and click Fine-tune: the model is adapted in "
            "the background (live loss plot; Cancel writes nothing) into a new version in the user models folder, "
            "which is then selected; earlier versions stay and one click reverts to them. A segmentation you "
            "edited, checked as corrected or drew yourself is never written into: Segment puts its result into a "
            "new segmentation. "
            "Models are bundled: nothing is downloaded. Research use only, not for diagnosis. "
            '<a href="https://github.com/HybridMIMSegment/HybridMIMSegment#readme">Documentation</a>.')
        self.parent.acknowledgementText = _(
            "Networks from MONAI; method: Xing et al., HybridMIM, IEEE JBHI 2024. The bundled hippocampus model was "
            "trained on the Medical Segmentation Decathlon Task04 data (CC-BY-SA 4.0).")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    """The bundled hippocampus MRI (MSD Task04, CC-BY-SA 4.0) in the Sample Data module, from the local file."""
    import SampleData

    try:
        volume = resourceFile("Samples", "hippocampus_017.nii.gz")
    except FileNotFoundError:
        return
    import hashlib

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="HybridMIMSegment", sampleName=SAMPLE_NAME, uris=volume.as_uri(),
        fileNames="hippocampus_017.nii.gz", nodeNames=SAMPLE_NAME,
        thumbnailFileName=str(MODULE_DIR / "Resources" / "Icons" / "HybridMIMSegment.png"),
        loadFileTypes="VolumeFile",
        checksums="SHA256:" + hashlib.sha256(volume.read_bytes()).hexdigest())  # a changed sample is re-read


#
# Parameter node
#


@parameterNodeWrapper
class HybridMIMSegmentParameterNode:
    """inputVolume: volume to segment. model: id or folder of the model (bundled or user). device: auto (GPU when
    present), cuda, mps (Apple), cpu. outputSegmentation: where results go (a new node when empty, or when the
    chosen one holds anything but Segment's own unedited result for this volume). replaceSegments: overwrite
    segments of the same name instead of adding new ones. fineTuneMethod, fineTuneMinutes: how and how long to
    fine-tune. holdOutForDice: keep the last checked segmentation out of training to measure Dice on it.
    segmentAfterFineTune: segment the input volume with the new version, into a new segmentation, when
    fine-tuning is done. showUncertaintyMap: Segment also overlays the model's voxelwise uncertainty."""

    inputVolume: vtkMRMLScalarVolumeNode
    model: str = DEFAULT_MODEL
    device: Annotated[str, Choice(DEVICES)] = "auto"
    outputSegmentation: vtkMRMLSegmentationNode
    replaceSegments: bool = True
    fineTuneMethod: Annotated[str, Choice(list(METHOD_LABELS))] = AUTOMATIC
    fineTuneMinutes: Annotated[float, WithinRange(0.1, 600.0)] = DEFAULT_MINUTES
    holdOutForDice: bool = False
    segmentAfterFineTune: bool = True
    showUncertaintyMap: bool = False


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
        self._taskDone = self._segmentDone  # what _pollTask calls when the Segment worker's task ends
        self._taskLabel = None  # where that task's status goes (Segment's or the Fine-tune section's line)
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._pollTask)
        self._fineTuneTask = None
        self._plottedRows = 0
        self._plotWidget = None
        self._activeVersionFolder = None
        self._fineTuneTimer = qt.QTimer()
        self._fineTuneTimer.setInterval(250)
        self._fineTuneTimer.connect("timeout()", self._pollFineTune)
        self._devices: list[str] = []  # what the worker's PyTorch sees (asked on macOS only, for mps)
        self._deviceQuery = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/HybridMIMSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = HybridMIMSegmentLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodeRemoved)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.refreshModels)
        self.ui.openModelsFolderButton.connect("clicked(bool)", self.onOpenModelsFolder)
        self.ui.fineTuneButton.connect("clicked(bool)", self.onFineTune)
        self.ui.rankButton.connect("clicked(bool)", self.onRank)
        self.ui.fineTuneCancelButton.connect("clicked(bool)", self.onCancelFineTune)
        self.ui.correctedSegmentationsSelector.connect("checkedNodesChanged()", self.onCorrectedChecked)
        self.ui.editedSlicesOnlyCheckBox.connect("clicked(bool)", self.onEditedSlicesOnly)
        self.ui.versionSelector.connect("currentIndexChanged(int)", self._updateButtons)
        self.ui.revertButton.connect("clicked(bool)", self.onRevert)
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.hide()
        self.ui.fineTuneProgressBar.hide()
        self.ui.lossPlotFrame.hide()
        self.refreshModels()
        self.initializeParameterNode()
        self._queryDevices()

    def cleanup(self) -> None:
        self.onCancel()
        self.onCancelFineTune()
        self._timer.stop()
        self._fineTuneTimer.stop()
        for process in (self._task and self._task.process, self._fineTuneTask and self._fineTuneTask.process,
                        self._deviceQuery):
            if process is not None:
                process.cleanup()  # the module is unloaded (the application is closing): leave no worker behind
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
        self.onCancelFineTune()
        self.setParameterNode(None)

    def onNodeRemoved(self, caller, event) -> None:
        """A deleted segmentation takes its hidden copy of the model's output along (not while the scene closes:
        everything goes then)."""
        from HybridMIMSegmentLib.segmenting import remove_orphaned_model_outputs

        if not slicer.mrmlScene.IsClosing():
            remove_orphaned_model_outputs(slicer.mrmlScene)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            volumes = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
            grey = [v for v in volumes if not v.IsA("vtkMRMLLabelMapVolumeNode")]
            if grey:
                self._parameterNode.inputVolume = grey[0]

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self._labelChoiceItems()
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._selectModelInCombobox(self._parameterNode.model)
            self._updateButtons()

    def _labelChoiceItems(self) -> None:
        """connectGui fills the method and device combos with the parameter values (it reads by index): show
        readable method names with what each does, and offer mps only where PyTorch sees an Apple GPU."""
        for index, method in enumerate(METHOD_LABELS):
            if index < self.ui.fineTuneMethodSelector.count:
                self.ui.fineTuneMethodSelector.setItemText(index, _(METHOD_LABELS[method]))
                self.ui.fineTuneMethodSelector.setItemData(index, _(METHOD_TOOLTIPS[method]), qt.Qt.ToolTipRole)
        mpsIndex = self.ui.deviceSelector.findText("mps")
        if mpsIndex >= 0:
            offered = "mps" in self._devices
            self.ui.deviceSelector.model().item(mpsIndex).setEnabled(offered)
            self.ui.deviceSelector.setItemData(mpsIndex, _("Apple GPU (Metal)") if offered else
                                               _("Apple GPU: not seen by PyTorch here"), qt.Qt.ToolTipRole)

    def _queryDevices(self) -> None:
        """On a Mac, ask the worker's PyTorch (in the background: importing torch takes seconds) whether it sees
        the Apple GPU; the mps choice is enabled when it does."""
        from HybridMIMSegmentLib.dependencies import missing_packages
        from HybridMIMSegmentLib.worker import WorkerProcess

        if platform.system() != "Darwin" or missing_packages():
            return
        query = self._deviceQuery = WorkerProcess("devices").start(["devices"])

        def check() -> None:
            query.poll()
            if not query.done:
                qt.QTimer.singleShot(500, check)
                return
            self._devices = (query.result or {}).get("devices", [])
            query.cleanup()
            self._deviceQuery = None
            if self._parameterNode:
                self._labelChoiceItems()

        check()

    # Models

    def refreshModels(self) -> None:
        """Fill the selector with bundled and user models; each item's tooltip is its card summary."""
        selected = self._parameterNode.model if self._parameterNode else DEFAULT_MODEL
        self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        for model in self.logic.models():
            card = model.card
            origin = _("bundled") if model.bundled else _("user")
            if card.task == "pretrained":
                origin += ", " + _("pre-trained only: fine-tune it first")
            self.ui.modelSelector.addItem(f"{card.name} — v{card.version} ({origin})", str(model.path))
            self.ui.modelSelector.setItemData(self.ui.modelSelector.count - 1, modelSummary(card), qt.Qt.ToolTipRole)
        self.ui.modelSelector.blockSignals(False)
        self.ui.userModelsFolderLabel.text = str(self.logic.userModelsFolder())
        self._selectModelInCombobox(selected)

    def _selectModelInCombobox(self, model: str) -> None:
        """Select ``model`` (a folder, or an id: its active version)."""
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
        self._updateVersions(folder)
        self._updateButtons()

    def _selectedCard(self):
        index = self.ui.modelSelector.currentIndex
        folder = self.ui.modelSelector.itemData(index) if index >= 0 else None
        return self.logic.cardOfFolder(folder) if folder else None

    def _updateVersions(self, folder) -> None:
        """List the versions of the selected model's id; the selected folder is the current item."""
        from HybridMIMSegmentLib.finetuning import version_entries

        self.ui.versionSelector.blockSignals(True)
        self.ui.versionSelector.clear()
        card = self.logic.cardOfFolder(folder) if folder else None
        self._activeVersionFolder = None
        for entry in version_entries(card.id) if card else []:
            if entry.active:
                self._activeVersionFolder = str(entry.path)
            self.ui.versionSelector.addItem(entry.text, str(entry.path))
            self.ui.versionSelector.setItemData(self.ui.versionSelector.count - 1, entry.tooltip, qt.Qt.ToolTipRole)
            self.ui.versionSelector.setItemData(self.ui.versionSelector.count - 1, entry.version, qt.Qt.UserRole + 1)
        index = self.ui.versionSelector.findData(str(folder)) if folder else -1
        self.ui.versionSelector.currentIndex = max(index, 0)
        self.ui.versionSelector.blockSignals(False)

    def onRevert(self) -> None:
        """Make the chosen version the one the model id means, and select it for Segment and Fine-tune."""
        with slicer.util.tryWithErrorDisplay(_("Could not change the model version."), waitCursor=True):
            card = self.logic.cardOfFolder(self._parameterNode.model)
            version = self.ui.versionSelector.itemData(self.ui.versionSelector.currentIndex, qt.Qt.UserRole + 1)
            folder = self.logic.revertModel(card.id, version)
            self._parameterNode.model = str(folder)
            self.refreshModels()
            self.ui.fineTuneStatusLabel.text = _("'{id}' now means version {version}.").format(id=card.id,
                                                                                              version=version)

    def onOpenModelsFolder(self) -> None:
        folder = self.logic.userModelsFolder()
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    # Segment / Cancel

    def _updateButtons(self, caller=None, event=None) -> None:
        segmenting, fineTuning = self._task is not None, self._fineTuneTask is not None
        busy = segmenting or fineTuning
        card = self._selectedCard()
        pretrainedOnly = card is not None and card.task != "segmentation"
        ready = bool(self._parameterNode and self._parameterNode.inputVolume and card and not pretrainedOnly)
        self.ui.segmentButton.enabled = ready and not busy
        self.ui.segmentButton.toolTip = (
            _("Wait for fine-tuning to finish") if fineTuning
            else _("This model is pre-trained only (it has no segmentation output): fine-tune it on a few corrected "
                   "segmentations first") if pretrainedOnly
            else _("Segment the input volume") if ready
            else _("Select an input volume and a model"))
        self.ui.cancelButton.enabled = segmenting
        ranking = segmenting and self._taskDone == self._rankDone
        self.ui.rankButton.enabled = bool(self._parameterNode and card and not pretrainedOnly) and not busy
        self.ui.rankButton.toolTip = (
            _("Wait for the running task to finish") if busy
            else _("Segment the checked unlabelled volumes (all volumes when none is checked), without changing the "
                   "scene, and list them most uncertain first: the volume the model is least sure about is the one "
                   "to correct next") if card and not pretrainedOnly
            else _("Select a model that segments (not pre-trained only)"))

        checked = len(self.ui.correctedSegmentationsSelector.checkedNodes())
        canFineTune = bool(self._parameterNode and card and checked)
        self.ui.fineTuneButton.enabled = canFineTune and not busy
        self.ui.fineTuneButton.toolTip = (
            _("Wait for the running task to finish") if busy
            else _("Fine-tune the selected model on the checked segmentations into a new version") if canFineTune
            else _("Check at least one corrected segmentation (and select a model)"))
        self.ui.fineTuneCancelButton.enabled = fineTuning or ranking
        self.ui.holdOutCheckBox.enabled = checked > 1
        selected = self.ui.versionSelector.itemData(self.ui.versionSelector.currentIndex)
        inUse = selected == self._activeVersionFolder and bool(self._parameterNode) and \
            selected == self._parameterNode.model
        self.ui.revertButton.enabled = bool(selected) and not fineTuning and not inUse

    def onCorrectedChecked(self) -> None:
        """A checked segmentation is a user's corrected work: Segment never writes into it again."""
        from HybridMIMSegmentLib.finetuning import edited_slices_only
        from HybridMIMSegmentLib.segmenting import mark_corrected

        checked = self.ui.correctedSegmentationsSelector.checkedNodes()
        for node in checked:
            mark_corrected(node)
        slicesOnly = {edited_slices_only(node) for node in checked}
        self.ui.editedSlicesOnlyCheckBox.enabled = bool(checked)
        self.ui.editedSlicesOnlyCheckBox.setCheckState(qt.Qt.PartiallyChecked if len(slicesOnly) > 1
                                                       else qt.Qt.Checked if slicesOnly == {True} else qt.Qt.Unchecked)
        self._updateButtons()

    def onEditedSlicesOnly(self, only: bool) -> None:
        """Kept on each checked segmentation: learn from the slices edited after Segment, or the whole volume."""
        from HybridMIMSegmentLib.finetuning import set_edited_slices_only

        self.ui.editedSlicesOnlyCheckBox.tristate = False
        for node in self.ui.correctedSegmentationsSelector.checkedNodes():
            set_edited_slices_only(node, only)

    def onSegment(self) -> None:
        self._startSegment(self._parameterNode.outputSegmentation)

    def _startSegment(self, segmentationNode) -> None:
        """Start the worker; the result goes to ``segmentationNode`` when that is safe, else to a new node."""
        with slicer.util.tryWithErrorDisplay(_("Segmentation failed to start."), waitCursor=True):
            if not self.logic.setupDependencies():
                self.ui.statusLabel.text = _("Python packages are missing; nothing was done.")
                return
            p = self._parameterNode
            self._task = self.logic.startSegment(p.inputVolume, model=p.model, device=p.device,
                                                 segmentationNode=segmentationNode, replace=p.replaceSegments,
                                                 uncertaintyMap=p.showUncertaintyMap)
            self._taskDone, self._taskLabel = self._segmentDone, self.ui.statusLabel
            self.ui.progressBar.value = 0
            self.ui.progressBar.show()
            self.ui.statusLabel.text = _("Starting...")
            self._timer.start()
            self._updateButtons()

    def onCancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._taskLabel.text = _("Cancelling...")

    def _pollTask(self) -> None:
        task = self._task
        if task is None:
            self._timer.stop()
            return
        finished = task.poll()
        self.ui.progressBar.value = int(100 * task.fraction)
        self._taskLabel.text = task.message
        if not finished:
            return
        self._timer.stop()
        self._task = None
        self.ui.progressBar.hide()
        try:
            self._taskDone(task)
        finally:
            self._updateButtons()

    def _segmentDone(self, task) -> None:
        from hybridmim.errors import Cancelled

        if isinstance(task.error, Cancelled):
            self.ui.statusLabel.text = _("Cancelled; the scene was not changed.")
        elif task.error is not None:
            self.ui.statusLabel.text = _("Failed: {error}").format(error=task.error)
            slicer.util.errorDisplay(_("Segmentation failed: {error}").format(error=task.error))
            logging.error("Segmentation failed: %s", task.error)
        else:
            with slicer.util.tryWithErrorDisplay(_("Could not store the result."), waitCursor=True):
                node = task.apply()
                self._parameterNode.outputSegmentation = node
                text = _("Done: {n} segments in '{name}'.").format(n=len(task.card.labels), name=node.GetName())
                if task.uncertainty is not None:
                    text += " " + _("Uncertainty {value:.3f}.").format(value=task.uncertainty)
                if task.note:
                    text += " " + _("A new segmentation was made: {why}.").format(why=task.note)
                if task.uncertainty_node is not None:
                    self._showUncertaintyMap(task.uncertainty_node)
                self.ui.statusLabel.text = text

    @staticmethod
    def _showUncertaintyMap(node) -> None:
        """Overlay the map on the slice views: 0 (certain) to 1 (guessing) from cold to hot, half transparent."""
        display = node.GetDisplayNode()
        display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeFileColdToHotRainbow.txt")
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
        slicer.util.setSliceViewerLayers(foreground=node, foregroundOpacity=0.4)

    # Which volume to correct next

    def onRank(self) -> None:
        """Rank the checked unlabelled volumes (all scalar volumes when none is checked) in the Segment worker's
        slot; the scene is not changed."""
        with slicer.util.tryWithErrorDisplay(_("Ranking failed to start."), waitCursor=True):
            if not self.logic.setupDependencies():
                self.ui.fineTuneStatusLabel.text = _("Python packages are missing; nothing was done.")
                return
            from HybridMIMSegmentLib.ranking import candidate_volumes

            volumes = list(self.ui.unlabeledVolumesSelector.checkedNodes()) or candidate_volumes(slicer.mrmlScene)
            p = self._parameterNode
            self._task = self.logic.startRank(volumes, model=p.model, device=p.device)
            self._taskDone, self._taskLabel = self._rankDone, self.ui.fineTuneStatusLabel
            self.ui.progressBar.value = 0
            self.ui.progressBar.show()
            self.ui.fineTuneStatusLabel.text = _("Ranking {n} volumes...").format(n=len(volumes))
            self._timer.start()
        self._updateButtons()

    def _rankDone(self, task) -> None:
        from hybridmim.errors import Cancelled

        if isinstance(task.error, Cancelled):
            self.ui.fineTuneStatusLabel.text = _("Ranking cancelled.")
        elif task.error is not None:
            self.ui.fineTuneStatusLabel.text = _("Ranking failed: {error}").format(error=task.error)
            logging.error("Ranking failed: %s", task.error)
        else:
            with slicer.util.tryWithErrorDisplay(_("Could not read the ranking."), waitCursor=True):
                self.ui.fineTuneStatusLabel.text = _("Ranking failed.")
                ranking = task.ranking()
                listed = ", ".join(f"'{node.GetName()}' {score:.3f}" for node, score in ranking)
                self.ui.fineTuneStatusLabel.text = _("Most uncertain first: {listed}. Correct '{name}' next.").format(
                    listed=listed, name=ranking[0][0].GetName()) if ranking else \
                    _("The ranked volumes were removed from the scene.")

    # Fine-tune / Cancel

    def onFineTune(self) -> None:
        try:
            self._startFineTune()
        except Exception:  # shown to the user already (tryWithErrorDisplay); the panel must stay usable
            logging.debug("Fine-tuning did not start", exc_info=True)
        finally:
            self._updateButtons()

    def _startFineTune(self) -> None:
        """Read the checked nodes (main thread), confirm a new label set, start the worker and the live plot."""
        with slicer.util.tryWithErrorDisplay(_("Fine-tuning could not start."), waitCursor=True):
            if not self.logic.setupDependencies():
                self.ui.fineTuneStatusLabel.text = _("Python packages are missing; nothing was done.")
                return
            segmentations = list(self.ui.correctedSegmentationsSelector.checkedNodes())
            heldOut = [segmentations.pop()] if self._parameterNode.holdOutForDice and len(segmentations) > 1 else []
            prepared = self.logic.prepareFineTune(segmentations, self.ui.unlabeledVolumesSelector.checkedNodes(),
                                                  model=self._parameterNode.model, validation=heldOut)
            from HybridMIMSegmentLib.finetuning import fine_tune_settings

            # a method that needs unlabelled volumes without any is reported now, before any question
            fine_tune_settings(self._parameterNode.fineTuneMethod, self._parameterNode.fineTuneMinutes,
                               labeled=len(prepared.labeled), unlabeled=len(prepared.unlabeled))
            inputs = prepared
        if inputs.label_set.new:
            question = self.logic.describeNewModel(inputs, self._parameterNode.model)
            if not slicer.util.confirmOkCancelDisplay(question + "\n\n" + _("Start fine-tuning?"),
                                                      _("New label set")):
                self.ui.fineTuneStatusLabel.text = _("Not started.")
                return
        with slicer.util.tryWithErrorDisplay(_("Fine-tuning could not start."), waitCursor=True):
            p = self._parameterNode
            self._fineTuneTask = self.logic.startFineTune(inputs, model=p.model, method=p.fineTuneMethod,
                                                          minutes=p.fineTuneMinutes, device=p.device)
            self._fineTuneTimer.start()  # polled from now on, whatever happens below
            self.ui.fineTuneProgressBar.value = 0
            self.ui.fineTuneProgressBar.show()
            notes = " ".join(inputs.notes)
            self.ui.fineTuneStatusLabel.text = _("Starting: {summary}.").format(summary=inputs.summary()) + (
                f" {notes}" if notes else "")
            self._startPlot()

    def _startPlot(self) -> None:
        """Show the (emptied) loss plot in the section; its nodes are hidden, unsaved and reused."""
        from HybridMIMSegmentLib.plotting import TrainingPlot

        plot = TrainingPlot(slicer.mrmlScene)
        plot.reset()
        viewNode = plot.view_node()
        if self._plotWidget is None:
            self._plotWidget = slicer.qMRMLPlotWidget()
            self._plotWidget.setMRMLScene(slicer.mrmlScene)
            self._plotWidget.minimumHeight = 220
            self._plotWidget.toolTip = _("Training loss per step (light), its running mean (dark) and, when a "
                                         "segmentation is held out, Dice on it (orange)")
            self.ui.lossPlotFrame.layout().addWidget(self._plotWidget)
        self._plotWidget.setMRMLPlotViewNode(viewNode)
        self._plottedRows = 0
        self.ui.lossPlotFrame.show()

    def onCancelFineTune(self) -> None:
        """Cancel the fine-tune, or the ranking that runs in the Segment worker's slot."""
        if self._fineTuneTask is not None:
            self._fineTuneTask.cancel()
            self.ui.fineTuneStatusLabel.text = _("Cancelling...")
        elif self._task is not None and self._taskDone == self._rankDone:
            self.onCancel()

    def _pollFineTune(self) -> None:
        task = self._fineTuneTask
        if task is None:
            self._fineTuneTimer.stop()
            return
        from HybridMIMSegmentLib.plotting import TrainingPlot

        finished = task.poll()
        cancelling = task.process.cancelling
        rows = task.rows[self._plottedRows:]
        if rows and not cancelling:  # (a closing scene cancels: plot nothing into the next one)
            TrainingPlot(slicer.mrmlScene).append(rows)
            self._plottedRows += len(rows)
        self.ui.fineTuneProgressBar.value = int(100 * task.fraction)
        if not cancelling:
            self.ui.fineTuneStatusLabel.text = task.message
        if not finished:
            return
        self._fineTuneTimer.stop()
        self._fineTuneTask = None
        self.ui.fineTuneProgressBar.hide()
        from hybridmim.errors import Cancelled

        try:
            if isinstance(task.error, Cancelled):
                self.ui.fineTuneStatusLabel.text = _("Cancelled: no model was written; segmentations and volumes "
                                                     "are unchanged.")
            elif task.error is not None:
                self.ui.fineTuneStatusLabel.text = _("Failed: {error}").format(error=task.error)
                slicer.util.errorDisplay(_("Fine-tuning failed: {error}").format(error=task.error))
                logging.error("Fine-tuning failed: %s", task.error)
            else:
                self._fineTuneDone(task)
        finally:
            self._updateButtons()

    def _fineTuneDone(self, task) -> None:
        """Select the new version and, if asked, segment the input volume with it into a new segmentation (the
        corrected ones are never written into). A run that completed although cancelled is only reported."""
        folder = task.result
        card = self.logic.cardOfFolder(folder)
        if task.process.cancelling or not self._parameterNode:
            self.refreshModels()
            self.ui.fineTuneStatusLabel.text = _("Fine-tuning had finished before the cancel took effect: version "
                                                 "{id} {version} was written and is active; use the Versions list "
                                                 "to go back.").format(id=card.id, version=card.version)
            return
        self._parameterNode.model = str(folder)
        self.refreshModels()
        self.ui.fineTuneStatusLabel.text = _("New version {id} {version} selected ({folder}).").format(
            id=card.id, version=card.version, folder=folder) + "\n" + card.validation_summary()
        if self._parameterNode.segmentAfterFineTune and self._parameterNode.inputVolume:
            self._startSegment(None)


def modelSummary(card) -> str:
    if card is None:
        return ""
    dice = card.metrics.get("dice", {})
    diceText = ", ".join(f"{name} {value:.2f}" for name, value in dice.items()) or _("not measured")
    parent = (card.training or {}).get("parent")
    origin = _("Fine-tuned from {id} {version}").format(id=parent.get("id"), version=parent.get("version")) + "\n" \
        if parent else ""
    structures = ", ".join(label.name for label in card.labels) if card.task == "segmentation" else \
        _("none (pre-trained encoder and decoder: fine-tune it on a few labelled volumes first)")
    return (f"{card.name}\n{origin}{_('Modality')}: {card.modality}; {_('structures')}: {structures}\n"
            f"{_('Validation Dice')}: {diceText}\n{_('Licence')}: {card.licence}\n{card.intended_use}")


#
# Logic
#


class HybridMIMSegmentLogic(ScriptedLoadableModuleLogic):
    """Scripting API. Blocking calls return results; ``start...`` calls return a running task (``poll()``,
    ``fraction``, ``message``, ``cancel()``, ``wait()``, ``error``). The network runs in a worker process. ::

        logic = slicer.util.getModuleLogic("HybridMIMSegment")  # or HybridMIMSegmentLogic()
        segmentationNode = logic.segment(volumeNode, model="hippocampus-cnn", device="auto")
        # ... correct it in Segment Editor, then adapt the model to it (and to unlabelled volumes):
        folder = logic.fineTune([segmentationNode], [otherVolume], model="hippocampus-cnn", minutes=5)
        newNode = logic.segment(volumeNode)  # the new version, into a new node: the corrections stay as they are
        logic.revertModel("hippocampus-cnn", "2.0.0")  # back to the bundled version
    """

    def getParameterNode(self):
        return HybridMIMSegmentParameterNode(super().getParameterNode())

    @staticmethod
    def setupDependencies(ask: bool | None = None) -> bool:
        """Install missing Python packages; ``ask`` None asks only in the GUI (never headless or under testing).
        False when the user declines."""
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
        """Folder of a model id (its active version) or of a model folder path."""
        from hybridmim.model_store import resolve_model

        return resolve_model(model)

    @staticmethod
    def segment(volumeNode, model: str = DEFAULT_MODEL, device: str = "auto", segmentationNode=None,
                replace: bool = True, progress=None):
        """Segment ``volumeNode`` and wait; returns the segmentation node holding the result: ``segmentationNode``
        when given and safe to write into, else a new one (never a corrected segmentation, never one of another
        volume). ``progress(fraction, message)`` is called while it runs."""
        from HybridMIMSegmentLib.segmenting import segment

        return segment(volumeNode, model, device, segmentationNode, replace, progress)

    @staticmethod
    def startSegment(volumeNode, model: str = DEFAULT_MODEL, device: str = "auto", segmentationNode=None,
                     replace: bool = True, uncertaintyMap: bool = False):
        """Start segmenting; returns a ``SegmentTask``: ``poll()`` it from a timer, then ``apply()`` (main thread)
        to put the result into the scene (with ``uncertaintyMap``, also the model's voxelwise uncertainty as a
        volume, ``task.uncertainty_node``). Until then the scene is unchanged; ``cancel()`` keeps it so."""
        from HybridMIMSegmentLib.segmenting import start_segment

        return start_segment(volumeNode, model, device, segmentationNode, replace, uncertaintyMap)

    @staticmethod
    def rank(volumeNodes, model: str = DEFAULT_MODEL, device: str = "auto"):
        """Segment ``volumeNodes`` (nothing is written, the scene is not changed) and wait; returns
        ``(volumeNode, uncertainty)`` pairs, most uncertain first: the first is the volume to correct next."""
        from HybridMIMSegmentLib.ranking import rank

        return rank(volumeNodes, model, device)

    @staticmethod
    def startRank(volumeNodes, model: str = DEFAULT_MODEL, device: str = "auto"):
        """Start ranking; returns a ``RankTask``: ``poll()`` it from a timer, then ``ranking()``."""
        from HybridMIMSegmentLib.ranking import start_rank

        return start_rank(volumeNodes, model, device)

    # Fine-tuning

    @staticmethod
    def fineTune(labeled, unlabeledVolumes=(), model: str = DEFAULT_MODEL, method: str | None = None,
                 minutes: float | None = None, steps: int | None = None, device: str = "auto", validation=(),
                 modelId: str | None = None, progress=None) -> Path:
        """Fine-tune ``model`` (id or folder) on corrected segmentations into a new version and wait; returns its
        folder, already the model's active version.

        ``labeled``: segmentation nodes, each alone (its volume is found from its reference geometry) or as
        ``(segmentationNode, volumeNode)``; from now on Segment never writes into them. ``unlabeledVolumes``:
        scalar volume nodes. ``validation``: segmentations held out to measure Dice. ``method``: a name of
        ``hybridmim.methods.METHODS`` or auto (the default: ``hybridmim.methods.default_method``); budget
        ``minutes`` and/or ``steps`` (default: ``hybridmim.settings.default_budget``).
        ``progress(row)`` gets each training step. The scene is read here and not changed.
        """
        from HybridMIMSegmentLib.finetuning import fine_tune

        return fine_tune(labeled, unlabeledVolumes, model, method, minutes, steps, device, validation, modelId,
                         progress)

    @staticmethod
    def prepareFineTune(labeled, unlabeledVolumes=(), model: str = DEFAULT_MODEL, validation=()):
        """Main thread: read the chosen nodes into engine inputs (images, label maps on each volume's grid, the label
        set and notes for the user). Raises a HybridMIMError saying what to change when they cannot be used."""
        from HybridMIMSegmentLib.finetuning import prepare_fine_tune

        return prepare_fine_tune(labeled, unlabeledVolumes, model, validation)

    @staticmethod
    def startFineTune(inputs, model: str = DEFAULT_MODEL, method: str | None = None, minutes: float | None = None,
                      steps: int | None = None, device: str = "auto", modelId: str | None = None):
        """Start a fine-tune on ``prepareFineTune``'s inputs; returns a ``FineTuneTask`` (``rows`` the steps so far,
        ``result`` the new folder once done; ``cancel()`` writes nothing). Settings are checked first."""
        from HybridMIMSegmentLib.finetuning import start_fine_tune_run

        return start_fine_tune_run(inputs, model, method, minutes, steps, device, modelId)

    @staticmethod
    def describeNewModel(inputs, model: str = DEFAULT_MODEL) -> str:
        """The question to ask before a new label set is trained (which new model id it makes, from what)."""
        from HybridMIMSegmentLib.finetuning import describe_new_model

        return describe_new_model(inputs, model)

    @staticmethod
    def modelVersions(modelId: str):
        """Every version of ``modelId`` (bundled and user), oldest first: ``ModelFolder(path, card, bundled)``."""
        from hybridmim.model_store import model_versions

        return model_versions(modelId)

    @staticmethod
    def revertModel(modelId: str, version: str) -> Path:
        """Make ``version`` the one ``modelId`` means (revert a fine-tune; nothing is deleted); returns its folder."""
        from hybridmim.model_store import set_active_version

        return set_active_version(modelId, version).path


#
# Test
#


class HybridMIMSegmentTest(ScriptedLoadableModuleTest):
    """Runs in Slicer: real sample, real model, real MRML, the real worker process (``PythonSlicer``). Each test
    method stands alone (Slicer's ctest runs each with its own setUp/tearDown): ``setUp`` clears the scene, points
    the user models folder at an empty temporary folder and installs missing Python packages without asking;
    ``tearDown`` puts the user's folder back."""

    def setUp(self):
        import tempfile

        slicer.mrmlScene.Clear()
        self._previousUserModels = os.environ.get("HYBRIDMIM_USER_MODELS")
        self._userModels = tempfile.mkdtemp(prefix="HybridMIMSegment-selftest-")
        os.environ["HYBRIDMIM_USER_MODELS"] = self._userModels
        self.logic = HybridMIMSegmentLogic()
        self.assertTrue(self.logic.setupDependencies(ask=False))

    def tearDown(self):
        import shutil

        if self._previousUserModels is None:
            os.environ.pop("HYBRIDMIM_USER_MODELS", None)
        else:
            os.environ["HYBRIDMIM_USER_MODELS"] = self._previousUserModels
        shutil.rmtree(self._userModels, ignore_errors=True)

    def runTest(self):
        """Reload and Test: every test method, each set up and torn down."""
        for name in sorted(n for n in dir(self) if n.startswith("test_")):
            self.setUp()
            try:
                getattr(self, name)()
            finally:
                self.tearDown()

    def _loadSample(self):
        volume = slicer.util.loadVolume(str(resourceFile("Samples", "hippocampus_017.nii.gz")))
        reference = slicer.util.loadLabelVolume(str(resourceFile("Samples", "hippocampus_017.label.nii.gz")))
        return volume, reference

    @staticmethod
    def _labels(segmentation, volume):
        from HybridMIMSegmentLib.mrml_bridge import labelmap_array_from_segmentation

        ids = [segmentation.GetSegmentation().GetNthSegmentID(i)
               for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
        return labelmap_array_from_segmentation(segmentation, ids, volume)

    def test_sample_is_in_sample_data(self):
        import SampleData

        registerSampleData()
        volume = SampleData.SampleDataLogic().downloadSample(SAMPLE_NAME)
        self.assertEqual(volume.GetImageData().GetDimensions(), (35, 48, 32))

    def test_segment_sample_reaches_card_dice(self):
        import numpy as np

        from hybridmim.metrics import dice_per_label

        self.delayDisplay("Segmenting the sample")
        volume, reference = self._loadSample()
        segmentation = self.logic.segment(volume, model=DEFAULT_MODEL)
        card = self.logic.cardOfFolder(self.logic.resolveModel(DEFAULT_MODEL))
        segments = segmentation.GetSegmentation()
        names = [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())]
        self.assertEqual(names, [label.name for label in card.labels])
        self.assertFalse(segments.GetNthSegment(0).GetNameAutoGenerated())
        dice = dice_per_label(self._labels(segmentation, volume), slicer.util.arrayFromVolume(reference), [1, 2])
        self.assertGreaterEqual(float(np.mean(list(dice.values()))), card.metrics["dice"]["mean"] - 0.05)
        self.delayDisplay(f"Dice {dice}")

    def test_transformed_volume_gets_the_same_voxels(self):
        """Oblique grid, a rotated and translated parent transform, and a transform hierarchy: same labels."""
        import numpy as np

        volume, _reference = self._loadSample()
        expected = self._labels(self.logic.segment(volume), volume)
        matrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrix)
        rotation = vtk.vtkTransform()
        rotation.RotateZ(25)
        rotation.RotateX(-15)
        rotated = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Multiply4x4(rotation.GetMatrix(), matrix, rotated)
        volume.SetIJKToRASMatrix(rotated)
        self.assertTrue(np.array_equal(self._labels(self.logic.segment(volume), volume), expected))

        outer, inner = (slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode") for _ in range(2))
        for node, (dx, angle) in ((outer, (15.0, 30.0)), (inner, (-4.0, -20.0))):
            transform = vtk.vtkTransform()
            transform.Translate(dx, 7.0, -3.0)
            transform.RotateY(angle)
            node.SetMatrixTransformToParent(transform.GetMatrix())
        volume.SetAndObserveTransformNodeID(outer.GetID())
        self.assertTrue(np.array_equal(self._labels(self.logic.segment(volume), volume), expected))
        inner.SetAndObserveTransformNodeID(outer.GetID())
        volume.SetAndObserveTransformNodeID(inner.GetID())
        segmentation = self.logic.segment(volume)
        self.assertEqual(segmentation.GetTransformNodeID(), inner.GetID())
        self.assertTrue(np.array_equal(self._labels(segmentation, volume), expected))

    def test_rank_lists_the_degraded_volume_first(self):
        import numpy as np

        volume, _reference = self._loadSample()
        noisy = slicer.modules.volumes.logic().CloneVolume(slicer.mrmlScene, volume, "noisy")
        array = slicer.util.arrayFromVolume(noisy).astype(np.float32)
        array += np.random.default_rng(0).normal(0, 0.8 * array.std(), array.shape).astype(np.float32)
        slicer.util.updateVolumeFromArray(noisy, array)
        before = slicer.mrmlScene.GetNumberOfNodes()
        ranking = self.logic.rank([volume, noisy])
        self.assertEqual([node.GetName() for node, _score in ranking], ["noisy", volume.GetName()])
        self.assertGreater(ranking[0][1], ranking[1][1])
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)

    def test_cancel_leaves_scene_unchanged(self):
        from hybridmim.errors import Cancelled

        volume, _reference = self._loadSample()
        before = slicer.mrmlScene.GetNumberOfNodes()
        task = self.logic.startSegment(volume)
        task.cancel()
        self.assertTrue(task.wait(120))
        if task.error is None:  # ended before the cancel landed: the result is simply not applied
            task.process.cleanup()
        else:
            self.assertIsInstance(task.error, Cancelled)
        self.assertFalse(task.process.folder.exists())
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)

    def _correctedSample(self):
        """The sample, segmented, then 'corrected' to its reference labels (what a user does in Segment Editor)."""
        from HybridMIMSegmentLib.mrml_bridge import image_from_volume_node, update_segmentation_node

        volume, reference = self._loadSample()
        segmentation = self.logic.segment(volume, model=DEFAULT_MODEL)
        card = self.logic.cardOfFolder(self.logic.resolveModel(DEFAULT_MODEL))
        update_segmentation_node(segmentation, image_from_volume_node(reference), card.labels, volume, replace=True)
        slicer.mrmlScene.RemoveNode(reference)
        return volume, segmentation

    def test_only_the_slices_edited_after_segment(self):
        """With 'Only the slices I edited', the slices where the correction differs from Segment's output are
        learned from and the others are unreviewed; the choice is kept on the segmentation; deleting the
        segmentation deletes the hidden copy of the model's output."""
        import numpy as np
        import SimpleITK as sitk

        from hybridmim.partial import UNREVIEWED
        from HybridMIMSegmentLib.finetuning import edited_slices_only, set_edited_slices_only
        from HybridMIMSegmentLib.segmenting import MODEL_OUTPUT_REFERENCE

        volume, segmentation = self._correctedSample()
        widget = slicer.util.getModuleWidget("HybridMIMSegment")
        set_edited_slices_only(segmentation, True)  # as a saved scene would bring it back
        widget.ui.correctedSegmentationsSelector.setCheckState(segmentation, qt.Qt.Checked)
        self.assertEqual(widget.ui.editedSlicesOnlyCheckBox.checkState(), qt.Qt.Checked)
        widget.ui.editedSlicesOnlyCheckBox.click()
        self.assertFalse(edited_slices_only(segmentation))
        widget.ui.editedSlicesOnlyCheckBox.click()
        self.assertTrue(edited_slices_only(segmentation))
        inputs = self.logic.prepareFineTune([segmentation])
        labels = sitk.GetArrayFromImage(inputs.labeled[0][1])
        reviewed = (labels != UNREVIEWED).any(axis=(1, 2))
        self.assertTrue(reviewed.any())
        self.assertTrue(np.array_equal(labels[reviewed], self._labels(segmentation, volume)[reviewed]))
        self.assertTrue(any("slices you edited" in note for note in inputs.notes))
        copy = segmentation.GetNodeReference(MODEL_OUTPUT_REFERENCE)
        self.assertIsNotNone(copy)
        slicer.mrmlScene.RemoveNode(segmentation)  # the widget's observer removes the hidden copy with it
        self.assertIsNone(slicer.mrmlScene.GetNodeByID(copy.GetID()))

    def test_fine_tune_keeps_corrections_and_revert_restores(self):
        import numpy as np

        self.delayDisplay("Fine-tuning on a corrected segmentation")
        volume, segmentation = self._correctedSample()
        corrected = self._labels(segmentation, volume)
        bundledEntry = self.logic.modelVersions(DEFAULT_MODEL)[0]
        bundled = bundledEntry.path
        nodes = slicer.mrmlScene.GetNumberOfNodes()
        folder = self.logic.fineTune([segmentation], model=DEFAULT_MODEL, method="supervised", steps=3)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)
        card = self.logic.cardOfFolder(folder)
        self.assertEqual(card.id, DEFAULT_MODEL)
        self.assertEqual(card.training["parent"]["version"], bundledEntry.card.version)
        self.assertEqual(self.logic.resolveModel(DEFAULT_MODEL), folder)

        again = self.logic.segment(volume, model=DEFAULT_MODEL, segmentationNode=segmentation)
        self.assertIsNot(again, segmentation)  # the corrected segmentation is never written into
        self.assertTrue(np.array_equal(self._labels(segmentation, volume), corrected))

        self.assertEqual(self.logic.revertModel(DEFAULT_MODEL, bundledEntry.card.version), bundled)
        self.assertEqual(self.logic.resolveModel(DEFAULT_MODEL), bundled)

    def test_cancelled_fine_tune_writes_nothing(self):
        import time

        from hybridmim.errors import Cancelled

        volume, segmentation = self._correctedSample()
        nodes = slicer.mrmlScene.GetNumberOfNodes()
        task = self.logic.startFineTune(self.logic.prepareFineTune([segmentation]), method="supervised",
                                        steps=100000)
        deadline = time.monotonic() + 300
        while not task.rows and not task.poll() and time.monotonic() < deadline:
            time.sleep(0.1)
        task.cancel()
        self.assertTrue(task.wait(300))
        self.assertIsInstance(task.error, Cancelled)
        self.assertEqual(list(self.logic.userModelsFolder().glob("*/card.json")), [])
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)

    def test_fine_tune_from_the_module_panel(self):
        """Check the corrected segmentation, click Fine-tune, wait (GUI responsive: events are processed), then the
        new version is selected, the plot has points, Segment ran again into a new node; revert works."""
        import time

        import numpy as np

        from HybridMIMSegmentLib.plotting import TrainingPlot

        volume, segmentation = self._correctedSample()
        corrected = self._labels(segmentation, volume)
        widget = slicer.util.getModuleWidget("HybridMIMSegment")
        widget.enter()
        parameters = self.logic.getParameterNode()
        parameters.inputVolume = volume
        parameters.outputSegmentation = segmentation
        parameters.model = DEFAULT_MODEL
        parameters.fineTuneMethod = "supervised"
        parameters.fineTuneMinutes = 0.1
        parameters.segmentAfterFineTune = True
        widget.refreshModels()
        widget.ui.correctedSegmentationsSelector.setCheckState(segmentation, qt.Qt.Checked)
        self.assertTrue(widget.ui.fineTuneButton.enabled)
        segmentations = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")

        self.addCleanup(widget.refreshModels)  # after tearDown: list the user's own models again
        widget.ui.fineTuneButton.click()
        try:
            self.assertTrue(widget.ui.fineTuneCancelButton.enabled)
            self.assertFalse(widget.ui.segmentButton.enabled)
            deadline = time.monotonic() + 600
            while (widget._fineTuneTask is not None or widget._task is not None) and time.monotonic() < deadline:
                slicer.app.processEvents()
                time.sleep(0.05)
            self.assertIsNone(widget._fineTuneTask)
            self.assertIsNone(widget._task)
        finally:  # a run still going must not write into the next test's (or the user's) models folder
            for task in (widget._fineTuneTask, widget._task):
                if task is not None:
                    task.process.cleanup()

        card = self.logic.cardOfFolder(parameters.model)
        self.assertIn("-ft.", card.version)
        self.assertEqual(str(self.logic.resolveModel(DEFAULT_MODEL)), parameters.model)
        chart = TrainingPlot(slicer.mrmlScene).chart_node()
        lossTable = slicer.mrmlScene.GetNodeByID(chart.GetNthPlotSeriesNode(0).GetTableNodeID())
        self.assertGreater(lossTable.GetNumberOfRows(), 0)
        # Segment again made a new segmentation and its hidden copy of the model's output
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), segmentations + 2)
        self.assertIsNot(parameters.outputSegmentation, segmentation)
        self.assertIsNotNone(parameters.outputSegmentation.GetNodeReference("HybridMIMSegment.ModelOutput"))
        self.assertTrue(np.array_equal(self._labels(segmentation, volume), corrected))
        self.assertEqual(widget.ui.versionSelector.count, 2)

        widget.ui.versionSelector.currentIndex = 0
        self.assertTrue(widget.ui.revertButton.enabled)
        widget.ui.revertButton.click()
        bundled = self.logic.modelVersions(DEFAULT_MODEL)[0].path
        self.assertEqual(self.logic.resolveModel(DEFAULT_MODEL), bundled)
        self.assertEqual(parameters.model, str(bundled))
