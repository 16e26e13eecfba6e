"""Fine-tuning from the scene: corrected segmentations (with their volumes) and unlabelled volumes become the
engine's inputs; the run goes to a background task that keeps a log of its losses for the live plot.

Why here and not in the engine: this is the MRML side. The scene is read once, on the main thread, before the
worker starts (MRML is not thread-safe); the worker only ever sees SimpleITK images. Uses MRML data classes only
(no Qt, no application), so it runs in Slicer and, for tests, with ``slicer-core``. Importing it does not import
torch (the engine's training code is imported when a run starts), so the module GUI opens before the Python
packages are installed.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from hybridmim.errors import HybridMIMError
from hybridmim.model_card import ModelCard

from .background import BackgroundTask
from .mrml_bridge import image_from_volume_node, labelmap_array_from_segmentation

if TYPE_CHECKING:
    from hybridmim.progress import CancelToken, ProgressCallback
    from hybridmim.trainer import TrainProgress, TrainSettings

#: Display names of the engine's methods (``hybridmim.methods.METHODS``; a test keeps the two in step).
METHOD_LABELS = {"auto": "Automatic", "supervised": "Supervised", "mean-teacher": "Mean Teacher", "bcp": "BCP"}
METHOD_TOOLTIPS = {
    "auto": "BCP for a single corrected segmentation with unlabelled volumes, otherwise Supervised: what measured "
            "best on the left-atrium benchmark for a few minutes of training (see the README).",
    "supervised": "Learns from the corrected segmentations only. Needs no unlabelled volumes.",
    "mean-teacher": "Also learns from the unlabelled volumes: a slowly averaged copy of the network labels them "
                    "and the network learns its confident voxels on perturbed views.",
    "bcp": "Bidirectional copy-paste: boxes are swapped between corrected and unlabelled volumes; the averaged "
           "copy labels the pasted unlabelled voxels.",
}


class FineTuneInputError(HybridMIMError):
    """The chosen segmentations or volumes cannot be used for fine-tuning; the message says what to change."""


# Scene -> engine inputs


def reference_volume_node(segmentation_node):
    """The volume a segmentation was drawn on, or None when that cannot be known.

    First the segmentation's reference-geometry node reference (set by Segment Editor and by Segment in this
    module); else, for a segmentation loaded from a file (no node reference), the one scalar volume in the scene
    whose grid equals the segmentation's stored reference geometry.
    """
    referenced = segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole())
    if _is_grey_volume(referenced):
        return referenced
    stored = _parse_geometry(segmentation_node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()))
    scene = segmentation_node.GetScene()
    if stored is None or scene is None:
        return None
    volumes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    matches = []
    for i in range(volumes.GetNumberOfItems()):
        volume = volumes.GetItemAsObject(i)
        if (_is_grey_volume(volume)
                and volume.GetParentTransformNode() is segmentation_node.GetParentTransformNode()
                and _same_geometry(stored, _volume_geometry(volume))):
            matches.append(volume)
    return matches[0] if len(matches) == 1 else None


def _is_grey_volume(node) -> bool:
    return (node is not None and node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode")
            and node.GetImageData() is not None)


def _parse_geometry(serialized: str) -> tuple[np.ndarray, tuple[int, ...]] | None:
    """Slicer's serialised image geometry: 16 IJK-to-RAS matrix values then the 6 extent values."""
    try:
        values = [float(v) for v in serialized.split(";") if v.strip()]
    except (AttributeError, ValueError):
        return None
    if len(values) != 22:
        return None
    return np.array(values[:16]).reshape(4, 4), tuple(int(round(v)) for v in values[16:])


def _volume_geometry(volume_node) -> tuple[np.ndarray, tuple[int, ...]] | None:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return _parse_geometry(slicer.vtkSegmentationConverter.SerializeImageGeometry(matrix, volume_node.GetImageData()))


def _same_geometry(a, b) -> bool:
    """Same grid; the tolerance absorbs the float formatting of serialised geometry (files round-trip it)."""
    return b is not None and a[1] == b[1] and np.allclose(a[0], b[0], rtol=1e-6, atol=1e-4)


def segment_names(segmentation_node) -> list[tuple[str, str]]:
    """(segment id, name) in the segmentation's order; names stripped of surrounding blanks."""
    segmentation = segmentation_node.GetSegmentation()
    return [(segmentation.GetNthSegmentID(i), segmentation.GetNthSegment(i).GetName().strip())
            for i in range(segmentation.GetNumberOfSegments())]


@dataclass
class LabelSet:
    """What the label values mean: value i + 1 is ``structures[i]``. ``label_names`` is what the engine is given:
    None when the structures are the model's own labels (kept, in the model's order), else the new label set."""

    structures: list[str]
    label_names: list[str] | None

    @property
    def new(self) -> bool:
        return self.label_names is not None


def decide_label_set(named_segmentations: Sequence[tuple[str, Sequence[str]]],
                     model_labels: Sequence[str]) -> LabelSet:
    """Every corrected segmentation must have the same segment names (what is learned must mean the same in each).
    If they are the model's labels, their values follow the model (matched by name, whatever the segment order);
    otherwise they are a new label set, valued in the first segmentation's order."""
    if not named_segmentations:
        raise FineTuneInputError("Check at least one corrected segmentation to fine-tune on")
    for name, names in named_segmentations:
        if not names:
            raise FineTuneInputError(f"Segmentation '{name}' has no segments: nothing to learn from it")
        duplicates = sorted({n for n in names if list(names).count(n) > 1})
        if duplicates:
            raise FineTuneInputError(f"Segmentation '{name}' has more than one segment named "
                                     f"{_quoted(duplicates)}: rename or merge them")
    first_name, first = named_segmentations[0]
    for name, names in named_segmentations[1:]:
        extra, missing = [n for n in names if n not in first], [n for n in first if n not in names]
        if extra or missing:
            parts = ([f"has {_quoted(extra)}, which '{first_name}' lacks"] if extra else []) + \
                    ([f"lacks {_quoted(missing)}"] if missing else [])
            raise FineTuneInputError("All corrected segmentations must have the same segment names. "
                                     f"Segmentation '{name}' {' and '.join(parts)}.")
    if set(first) == set(model_labels) and len(first) == len(model_labels):
        return LabelSet(list(model_labels), None)
    return LabelSet(list(first), list(first))


def _quoted(names: Sequence[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def training_pair(segmentation_node, volume_node, structures: Sequence[str]) -> tuple[sitk.Image, sitk.Image]:
    """The volume as the engine reads it and a uint8 label map on exactly its grid (value i + 1 for the segment
    named ``structures[i]``; segments are exported by Slicer onto the volume's geometry)."""
    if len(structures) > 255:
        raise FineTuneInputError("At most 255 structures can be fine-tuned at once")
    ids_by_name = {name: segment_id for segment_id, name in segment_names(segmentation_node)}
    missing = [name for name in structures if name not in ids_by_name]
    if missing:
        raise FineTuneInputError(f"Segmentation '{segmentation_node.GetName()}' has no segment {_quoted(missing)}")
    image = image_from_volume_node(volume_node)
    values = labelmap_array_from_segmentation(segmentation_node, [ids_by_name[n] for n in structures], volume_node)
    if values.shape != sitk.GetArrayViewFromImage(image).shape:
        raise FineTuneInputError(f"Slicer exported segmentation '{segmentation_node.GetName()}' on a grid of "
                                 f"{values.shape[::-1]} voxels, not the {image.GetSize()} of its volume")
    label = sitk.GetImageFromArray(values.astype(np.uint8))
    label.CopyInformation(image)
    return image, label


@dataclass
class FineTuneInputs:
    """Everything a run needs, read from the scene: images and label maps (SimpleITK, safe to hand to a worker),
    the label set, and what the user should be told before starting."""

    labeled: list[tuple[sitk.Image, sitk.Image]]
    unlabeled: list[sitk.Image]
    label_set: LabelSet
    validation: list[tuple[sitk.Image, sitk.Image]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"{len(self.labeled)} corrected segmentation(s) ({', '.join(self.label_set.structures)}), "
                f"{len(self.unlabeled)} unlabelled volume(s)")
        if self.validation:
            text += f", {len(self.validation)} held out to measure Dice"
        return text


def _as_pair(item) -> tuple[Any, Any]:
    """A segmentation node alone, or (segmentation node, volume node or None)."""
    if isinstance(item, (tuple, list)):
        if len(item) != 2:
            raise FineTuneInputError("Give each corrected segmentation as (segmentation node, volume node or None)")
        return item[0], item[1]
    return item, None


def _resolve_volume(segmentation_node, volume_node):
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise FineTuneInputError("A corrected segmentation must be a segmentation node")
    volume = volume_node if volume_node is not None else reference_volume_node(segmentation_node)
    if volume is None:
        raise FineTuneInputError(f"Cannot tell which volume segmentation '{segmentation_node.GetName()}' was drawn "
                                 "on: give the volume with it (Python: (segmentation, volume)), or select its volume "
                                 "as Segment Editor's source volume once")
    if not _is_grey_volume(volume):
        raise FineTuneInputError(f"'{volume.GetName()}' is not a grey-level volume with image data")
    return volume


def gather_inputs(labeled: Sequence[Any], unlabeled_volumes: Sequence[Any], card: ModelCard,
                  validation: Sequence[Any] = ()) -> FineTuneInputs:
    """Main thread only. Corrected segmentations (each alone or with its volume), unlabelled volumes and optional
    held-out segmentations -> engine inputs. Raises FineTuneInputError, with what to change, for unusable input."""
    pairs = [_as_pair(item) for item in labeled]
    held_out = [_as_pair(item) for item in validation]
    if not pairs:
        raise FineTuneInputError("Check at least one corrected segmentation to fine-tune on")
    resolved = [(segmentation, _resolve_volume(segmentation, volume)) for segmentation, volume in pairs + held_out]
    label_set = decide_label_set([(s.GetName(), [name for _, name in segment_names(s)]) for s, _ in resolved],
                                 [label.name for label in sorted(card.labels, key=lambda label: label.value)])
    notes = []
    if label_set.new:
        notes.append(f"The segment names ({_quoted(label_set.structures)}) are not the model's labels "
                     f"({_quoted([label.name for label in card.labels])}): a new model with a new output layer "
                     "will be made; the model itself is not changed.")
    images, present_anywhere = [], set()
    for segmentation, volume in resolved:
        image, label = training_pair(segmentation, volume, label_set.structures)
        present = set(np.unique(sitk.GetArrayViewFromImage(label)).tolist()) - {0}
        if not present:
            raise FineTuneInputError(f"Segmentation '{segmentation.GetName()}' is empty on volume "
                                     f"'{volume.GetName()}' (no segment has a voxel inside it): nothing to learn")
        absent = [name for i, name in enumerate(label_set.structures) if i + 1 not in present]
        if absent:
            notes.append(f"{_quoted(absent)} empty in '{segmentation.GetName()}': the model learns that "
                         "they are absent from that volume.")
        if len(images) < len(pairs):
            present_anywhere |= present
        images.append((image, label))
    never = [name for i, name in enumerate(label_set.structures) if i + 1 not in present_anywhere]
    if never:
        raise FineTuneInputError(f"Segment(s) {_quoted(never)} are empty in every corrected segmentation: paint "
                                 "them in at least one, or delete them from all")

    labeled_volume_ids = {volume.GetID() for _, volume in resolved}
    unlabeled, seen = [], set()
    for volume in unlabeled_volumes:
        if volume is None or volume.GetID() in seen:
            continue
        seen.add(volume.GetID())
        if volume.GetID() in labeled_volume_ids:
            notes.append(f"'{volume.GetName()}' has a corrected segmentation; it is not also used as unlabelled.")
            continue
        if not _is_grey_volume(volume):
            raise FineTuneInputError(f"Unlabelled volume '{volume.GetName()}' is not a grey-level volume")
        unlabeled.append(image_from_volume_node(volume))
    return FineTuneInputs(images[:len(pairs)], unlabeled, label_set, images[len(pairs):],
                          [f"{s.GetName()} on {v.GetName()}" for s, v in resolved], notes)


# The run


def fine_tune_settings(method: str | None = None, minutes: float | None = None, steps: int | None = None,
                       labeled: int = 1, unlabeled: int = 0) -> TrainSettings:
    """The engine's settings, checked now (on the main thread) so that a bad choice is reported before a worker
    starts; no method means the engine's default (supervised without unlabelled volumes)."""
    from hybridmim.finetune import settings_from

    settings = settings_from(method=method, steps=steps, minutes=minutes, labeled=labeled, unlabeled=unlabeled)
    settings.check(unlabeled)
    return settings


def describe_new_model(inputs: FineTuneInputs, card: ModelCard) -> str:
    """What the user is asked to confirm before a new label set is trained (the engine's own naming)."""
    from hybridmim.finetune import target_card

    target, _ = target_card(card, inputs.label_set.label_names, None)
    return (f"The corrected segmentations name {_quoted(inputs.label_set.structures)}, not the labels of "
            f"'{card.id}' ({_quoted([label.name for label in card.labels])}).\n\nA new model '{target.id}' "
            f"({target.name}) will be trained with a new output layer, starting from '{card.id}' {card.version}, "
            "which is left unchanged.")


@dataclass
class LogRow:
    step: int
    seconds: float
    fraction: float
    loss: float
    losses: dict[str, float]
    learning_rate: float
    validation_dice: float | None


class TrainingLog:
    """The run's progress reports, appended by the worker and read by the GUI timer (a lock, no Qt/MRML)."""

    def __init__(self) -> None:
        self._rows: list[LogRow] = []
        self._lock = threading.Lock()

    def record(self, progress: TrainProgress) -> LogRow:
        row = LogRow(progress.step, progress.seconds, progress.fraction, float(sum(progress.losses.values())),
                     dict(progress.losses), progress.learning_rate, progress.validation_dice)
        with self._lock:
            self._rows.append(row)
        return row

    def rows(self, start: int = 0) -> list[LogRow]:
        with self._lock:
            return self._rows[start:]

    def __len__(self) -> int:
        with self._lock:
            return len(self._rows)


def progress_message(row: LogRow) -> str:
    """One status line: step, loss, Dice when measured, time spent and left."""
    text = f"Step {row.step}: loss {row.loss:.3f}"
    if row.validation_dice is not None:
        text += f", validation Dice {row.validation_dice:.3f}"
    text += f"; {_clock(row.seconds)} spent"
    if 0 < row.fraction < 1:
        text += f", about {_clock(row.seconds * (1 - row.fraction) / row.fraction)} left"
    return text


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class FineTuneTask(BackgroundTask):
    """A fine-tuning run: ``result`` is the new model folder (already the active version of its id), ``log`` the
    losses so far, ``inputs`` what it was given. Cancelling writes nothing (the engine guarantees it)."""

    def __init__(self, inputs: FineTuneInputs, model: str | Path, settings: TrainSettings, device: str = "auto",
                 model_id: str | None = None) -> None:
        super().__init__(self._fine_tune, name="HybridMIMSegment fine-tuning")
        self.inputs, self.model, self.settings, self.device, self.model_id = inputs, model, settings, device, model_id
        self.log = TrainingLog()

    def _fine_tune(self, report: ProgressCallback, cancel: CancelToken) -> Path:
        from hybridmim.finetune import fine_tune

        state = {"fraction": 0.0}

        def on_progress(progress: TrainProgress) -> None:
            row = self.log.record(progress)
            state["fraction"] = progress.fraction
            report(progress.fraction, progress_message(row))

        def on_status(message: str) -> None:
            report(state["fraction"], message)

        inputs = self.inputs
        return fine_tune(self.model, inputs.labeled, inputs.unlabeled, self.settings, validation=inputs.validation,
                         label_names=inputs.label_set.label_names, model_id=self.model_id, device=self.device,
                         progress=on_progress, cancel=cancel, status=on_status)


# Versions


@dataclass
class VersionEntry:
    """One version of a model id as the version list shows it."""

    version: str
    path: Path
    bundled: bool
    active: bool
    text: str
    tooltip: str


def version_entries(model_id: str) -> list[VersionEntry]:
    """Versions of ``model_id``, oldest first; ``active`` marks the one the id resolves to (what Segment uses when
    given the id, and what a revert changes)."""
    from hybridmim.model_store import model_versions, resolve_model

    versions = model_versions(model_id)
    if not versions:
        return []
    active = resolve_model(model_id)
    entries = []
    for folder in versions:
        card = folder.card
        is_active = folder.path == active
        origin = "bundled" if folder.bundled else "fine-tuned" if (card.training or {}).get("parent") else "user"
        text = f"{card.version} ({origin})"
        if is_active:
            text += " - active"
        entries.append(VersionEntry(card.version, folder.path, folder.bundled, is_active, text, version_tooltip(card)))
    return entries


def version_tooltip(card: ModelCard) -> str:
    """Where a version came from and how good it measured (fine-tunes: parent, method, budget spent)."""
    lines = [f"{card.id} {card.version}"]
    training = card.training or {}
    parent = training.get("parent")
    if parent:
        lines.append(f"Fine-tuned from {parent.get('id')} {parent.get('version')} with {training.get('method')}: "
                     f"{training.get('steps')} steps, {_clock(float(training.get('time_seconds') or 0))} "
                     f"on {training.get('hardware', 'unknown hardware')}")
        lines.append(f"{training.get('labeled_volumes', '?')} corrected, "
                     f"{training.get('unlabeled_volumes', '?')} unlabelled volumes")
    dice = (card.metrics or {}).get("dice")
    if summary := card.validation_summary():
        lines.append(summary)
    elif isinstance(dice, dict) and dice:
        lines.append("Dice: " + ", ".join(f"{name} {value:.3f}" for name, value in dice.items()
                                          if isinstance(value, (int, float))))
    elif isinstance(dice, (int, float)):
        lines.append(f"Dice: {dice:.3f}")
    else:
        lines.append("Dice: not measured")
    return "\n".join(lines)

