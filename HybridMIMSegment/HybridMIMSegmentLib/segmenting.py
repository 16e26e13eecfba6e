"""Segment a volume node in a worker process and put the result into the scene without losing anyone's work.

Main thread only (MRML). The volume is written with its exact geometry to the worker's private folder, the
worker (``hybridmim segment``) writes a label map there, and ``apply`` imports it. Where the result goes is decided
here, once: Segment writes into a chosen segmentation only when it is empty, or when it holds exactly what Segment
last wrote there for this volume (a fingerprint of its voxels is kept on the node). A segmentation the user
edited, checked as corrected, drew alone, or made for another volume is never written into: a new node is made
instead (``SegmentTask.note`` says why).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import SimpleITK as sitk

from hybridmim.errors import HybridMIMError
from hybridmim.model_card import ModelCard
from hybridmim.model_store import DEFAULT_MODEL, resolve_model

from .mrml_bridge import (
    image_from_volume_node,
    labelmap_array_from_segmentation,
    reference_volume_node,
    update_segmentation_node,
    volume_node_like,
)
from .worker import Record, WorkerTask

#: Node attribute of a segmentation the user corrected (checked for fine-tuning, or fine-tuned on).
CORRECTED_ATTRIBUTE = "HybridMIMSegment.Corrected"
#: Node attribute: fingerprint of the voxels Segment last wrote (any later edit changes it).
WRITTEN_ATTRIBUTE = "HybridMIMSegment.Written"
#: Node attribute: the model's uncertainty about the volume when Segment wrote it (0 certain .. 1 guessing).
UNCERTAINTY_ATTRIBUTE = "HybridMIMSegment.Uncertainty"
#: Node reference to a hidden copy of what Segment wrote (the model's output): the slices a user edits afterwards
#: are found against it, to fine-tune on those slices only.
MODEL_OUTPUT_REFERENCE = "HybridMIMSegment.ModelOutput"
#: Node attribute marking such a hidden copy, so that it can be removed with its segmentation.
MODEL_OUTPUT_ATTRIBUTE = "HybridMIMSegment.IsModelOutput"
#: Node reference from a segmentation to the uncertainty map volume Segment made with it (reused by the next run).
UNCERTAINTY_MAP_REFERENCE = "HybridMIMSegment.UncertaintyMap"

Progress = Callable[[float, str], None]


def mark_corrected(segmentation_node) -> None:
    """From now on Segment never writes into this segmentation (it is a user's corrected work)."""
    segmentation_node.SetAttribute(CORRECTED_ATTRIBUTE, "true")


def is_corrected(segmentation_node) -> bool:
    return segmentation_node is not None and segmentation_node.GetAttribute(CORRECTED_ATTRIBUTE) == "true"


def keep_model_output(segmentation_node) -> None:
    """Keep a hidden copy of the segmentation as Segment wrote it (replacing an earlier copy). Slicer saves hidden
    nodes' data only in a scene bundle (.mrb); ``model_output`` tells when it was lost."""
    scene = segmentation_node.GetScene()
    copy = segmentation_node.GetNodeReference(MODEL_OUTPUT_REFERENCE)
    if copy is None:
        copy = scene.CreateNodeByClass("vtkMRMLSegmentationNode")
        copy.UnRegister(None)  # the scene holds it
        copy.SetName(scene.GenerateUniqueName(f"{segmentation_node.GetName()} (model output)"))
        copy.SetHideFromEditors(True)  # before it is added: never listed, not even briefly
        copy.SetAttribute(MODEL_OUTPUT_ATTRIBUTE, "true")
        scene.AddNode(copy)
        segmentation_node.SetNodeReferenceID(MODEL_OUTPUT_REFERENCE, copy.GetID())
    copy.SetAndObserveTransformNodeID(segmentation_node.GetTransformNodeID())
    copy.GetSegmentation().DeepCopy(segmentation_node.GetSegmentation())


def remove_orphaned_model_outputs(scene) -> int:
    """Remove the hidden model-output copies whose segmentation is gone (the user deleted it: the copy is never
    listed, so nobody else can); returns how many were removed."""
    nodes = [scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
             for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))]
    referenced = {node.GetNodeReferenceID(MODEL_OUTPUT_REFERENCE) for node in nodes}
    orphans = [node for node in nodes
               if node.GetAttribute(MODEL_OUTPUT_ATTRIBUTE) == "true" and node.GetID() not in referenced]
    for node in orphans:
        scene.RemoveNode(node)
    return len(orphans)


def model_output(segmentation_node):
    """The hidden copy of what Segment last wrote into ``segmentation_node``; None if Segment did not write it or
    the copy's data was not saved with the scene (an empty copy would make every painted slice look edited)."""
    copy = segmentation_node.GetNodeReference(MODEL_OUTPUT_REFERENCE)
    return copy if copy is not None and copy.GetSegmentation().GetNumberOfSegments() else None


def fingerprint(segmentation_node, volume_node) -> str:
    """What the segmentation holds on the volume's grid: segment ids, names, and the voxels of each."""
    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    digest = hashlib.sha256(repr([(i, segmentation.GetSegment(i).GetName()) for i in ids]).encode())
    if ids:
        digest.update(labelmap_array_from_segmentation(segmentation_node, ids, volume_node).tobytes())
    return f"{volume_node.GetID()}:{digest.hexdigest()}"


def why_not_reuse(segmentation_node, volume_node) -> str | None:
    """Why a new result must not go into ``segmentation_node`` (None: it may)."""
    if segmentation_node is None:
        return None
    name = segmentation_node.GetName()
    if is_corrected(segmentation_node):
        return f"'{name}' holds corrections, which are never overwritten"
    if segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
        return None
    reference = reference_volume_node(segmentation_node)
    if reference is not None and reference.GetID() != volume_node.GetID():
        return f"'{name}' belongs to volume '{reference.GetName()}'"
    written = segmentation_node.GetAttribute(WRITTEN_ATTRIBUTE)
    if not written or reference is None:
        return f"'{name}' was not made by Segment on '{volume_node.GetName()}'"
    if written != fingerprint(segmentation_node, volume_node):
        return f"'{name}' was edited after Segment wrote it, and edits are never overwritten"
    return None


def new_segmentation_node(volume_node, card: ModelCard):
    scene = volume_node.GetScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                   scene.GenerateUniqueName(f"{volume_node.GetName()} {card.id}"))
    node.CreateDefaultDisplayNodes()
    return node


class SegmentTask(WorkerTask):
    """One Segment run. Construct on the main thread (it writes the input and starts the worker), then ``poll``
    (GUI timer) or ``wait``; ``apply`` puts the result into the scene. ``cancel`` leaves the scene unchanged. With
    ``uncertainty_map``, ``apply`` also puts the model's voxelwise uncertainty into a volume node
    (``uncertainty_node``)."""

    keep_outputs = True  # the label map is read by ``apply``, which removes the folder

    def __init__(self, volume_node, model_folder: str | Path, device: str = "auto", segmentation_node=None,
                 replace: bool = True, uncertainty_map: bool = False) -> None:
        self.model_folder = Path(model_folder)
        self.card = ModelCard.load(self.model_folder)
        if self.card.task != "segmentation":
            raise HybridMIMError(f"Model '{self.card.id}' is pre-trained only (it has no segmentation output): "
                                 "fine-tune it on a few corrected segmentations first")
        self.image = image_from_volume_node(volume_node)
        self.volume_node, self.replace, self.device = volume_node, replace, device
        self.note = why_not_reuse(segmentation_node, volume_node)
        self.segmentation_node = None if self.note else segmentation_node
        self.uncertainty: float | None = None  # the model's, once applied (hybridmim.uncertainty)
        self.uncertainty_map, self.uncertainty_node = uncertainty_map, None
        super().__init__("segment")
        self.image = None  # written; do not hold a second copy of the voxels

    def arguments(self, folder: Path) -> list[str]:
        source, self.output = folder / "input.nrrd", folder / "labels.nrrd"
        sitk.WriteImage(self.image, str(source), useCompression=False)
        map_option = ["--uncertainty-map", str(folder / "uncertainty.nrrd")] if self.uncertainty_map else []
        return ["segment", str(source), "-o", str(self.output), "--model", str(self.model_folder),
                "--device", self.device, *map_option]

    def take(self, records: list[Record]) -> None:
        for record in records:
            if record["event"] == "progress":
                self.fraction, self.message = float(record.get("fraction") or 0.0), str(record.get("message", ""))

    def wait(self, timeout: float | None = None, progress: Progress | None = None) -> bool:
        """Block until done (True) or ``timeout`` seconds passed (False); ``progress(fraction, message)``."""
        def on_records(records: list[Record]) -> None:
            if progress is not None:
                progress(self.fraction, self.message)

        return super().wait(timeout, on_records)

    def apply(self):
        """Main thread, once ended: raise the worker's error, or import the labels and return the segmentation
        node (the chosen one, or a new one). The worker's folder is removed either way."""
        try:
            if self.process.error is not None:
                raise self.process.error
            if not self.process.done:
                raise HybridMIMError("Segment has not finished yet")
            if self.volume_node.GetScene() is None:
                raise HybridMIMError(f"Volume '{self.volume_node.GetName()}' was removed from the scene while it "
                                     "was being segmented; nothing was written")
            node = self.segmentation_node
            if node is not None:  # decided again: it may have been checked, edited or removed meanwhile
                self.note = "the chosen segmentation was removed" if node.GetScene() is None else \
                    why_not_reuse(node, self.volume_node)
                node = None if self.note else node
            labelmap = sitk.ReadImage(str(self.output))
            created = node is None
            if created:
                node = new_segmentation_node(self.volume_node, self.card)
            try:
                update_segmentation_node(node, labelmap, self.card.labels, self.volume_node, self.replace)
            except BaseException:
                if created:
                    node.GetScene().RemoveNode(node)
                raise
            node.SetAttribute(WRITTEN_ATTRIBUTE, fingerprint(node, self.volume_node))
            keep_model_output(node)
            self.uncertainty = (self.process.result or {}).get("uncertainty")
            if self.uncertainty is not None:
                node.SetAttribute(UNCERTAINTY_ATTRIBUTE, f"{self.uncertainty:.6f}")
            if self.uncertainty_map:
                self.uncertainty_node = volume_node_like(
                    self.volume_node, sitk.ReadImage(str(self.output.parent / "uncertainty.nrrd")),
                    f"{self.volume_node.GetName()} uncertainty ({self.card.id})",
                    node.GetNodeReference(UNCERTAINTY_MAP_REFERENCE))
                node.SetNodeReferenceID(UNCERTAINTY_MAP_REFERENCE, self.uncertainty_node.GetID())
            self.segmentation_node = node
            return node
        finally:
            self.process.cleanup()

    def finish(self, progress: Progress | None = None):
        """Wait for the worker, then ``apply`` (scripts)."""
        self.wait(progress=progress)
        return self.apply()


def start_segment(volume_node, model: str | Path = DEFAULT_MODEL, device: str = "auto", segmentation_node=None,
                  replace: bool = True, uncertainty_map: bool = False) -> SegmentTask:
    """Start segmenting ``volume_node`` with ``model`` (an id, which means its active version, or a folder)."""
    return SegmentTask(volume_node, resolve_model(model), device, segmentation_node, replace, uncertainty_map)


def segment(volume_node, model: str | Path = DEFAULT_MODEL, device: str = "auto", segmentation_node=None,
            replace: bool = True, progress: Progress | None = None):
    """Segment and wait (scripts): the segmentation node that holds the result."""
    return start_segment(volume_node, model, device, segmentation_node, replace).finish(progress)
