"""Fine-tuning from the scene: corrected segmentations (with their volumes) and unlabelled volumes become the
engine's inputs; the run goes to a worker process (``hybridmim finetune``) whose steps feed the live plot.

Why here and not in the engine: this is the MRML side. The scene is read once, on the main thread, and written as
files with their exact geometry to the worker's private folder; the worker never sees MRML. Uses MRML data
classes only (no Qt, no application), so it runs in Slicer and, for tests, with ``slicer-core``. Never imports
torch: Slicer's process only reads cards and nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from hybridmim.errors import HybridMIMError
from hybridmim.finetune_plan import plan_fine_tune
from hybridmim.model_card import ModelCard
from hybridmim.model_store import DEFAULT_MODEL, resolve_model
from hybridmim.partial import UNREVIEWED, partly_reviewed
from hybridmim.settings import TrainSettings, settings_from

from .mrml_bridge import (
    image_from_volume_node,
    is_grey_volume,
    labelmap_array_from_segmentation,
    reference_volume_node,
)
from .segmenting import mark_corrected, model_output
from .worker import Record, WorkerTask


class FineTuneInputError(HybridMIMError):
    """The chosen segmentations or volumes cannot be used for fine-tuning; the message says what to change."""


#: Node attribute of a corrected segmentation: what the user reviewed, the whole volume (absent or "volume") or
#: only the slices edited after Segment ("slices"; the rest is treated as unlabelled).
REVIEWED_ATTRIBUTE = "HybridMIMSegment.Reviewed"
REVIEWED_SLICES = "slices"


def set_edited_slices_only(segmentation_node, only: bool) -> None:
    segmentation_node.SetAttribute(REVIEWED_ATTRIBUTE, REVIEWED_SLICES if only else "volume")


def edited_slices_only(segmentation_node) -> bool:
    return segmentation_node is not None and segmentation_node.GetAttribute(REVIEWED_ATTRIBUTE) == REVIEWED_SLICES


# Scene -> engine inputs


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
    if len(structures) >= UNREVIEWED:
        raise FineTuneInputError(f"At most {UNREVIEWED - 1} structures can be fine-tuned at once")
    image = image_from_volume_node(volume_node)
    return image, label_image(segmentation_node, volume_node, structures, image)


def label_image(segmentation_node, volume_node, structures: Sequence[str], image: sitk.Image,
                missing_ok: bool = False) -> sitk.Image:
    """The segments named ``structures`` as a label map on ``image``'s grid (value i + 1 for ``structures[i]``);
    with ``missing_ok`` a structure the segmentation lacks is left empty instead of refused."""
    ids_by_name = {name: segment_id for segment_id, name in segment_names(segmentation_node)}
    missing = [name for name in structures if name not in ids_by_name]
    if missing and not missing_ok:
        raise FineTuneInputError(f"Segmentation '{segmentation_node.GetName()}' has no segment {_quoted(missing)}")
    present = [name for name in structures if name in ids_by_name]
    values = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    if present:
        exported = labelmap_array_from_segmentation(segmentation_node, [ids_by_name[n] for n in present], volume_node)
        if exported.shape != values.shape:
            raise FineTuneInputError(f"Slicer exported segmentation '{segmentation_node.GetName()}' on a grid of "
                                     f"{exported.shape[::-1]} voxels, not the {image.GetSize()} of its volume")
        lookup = np.array([0] + [structures.index(name) + 1 for name in present], np.uint8)
        values = lookup[exported]
    label = sitk.GetImageFromArray(values)
    label.CopyInformation(image)
    return label


def edited_slices_label(segmentation_node, volume_node, structures: Sequence[str], image: sitk.Image,
                        label: sitk.Image) -> tuple[sitk.Image, str]:
    """``label`` with only the slices edited since Segment wrote it (the rest ``UNREVIEWED``) and a note."""
    name = segmentation_node.GetName()
    original = model_output(segmentation_node)
    if original is None:
        raise FineTuneInputError(f"The slices you edited in '{name}' cannot be found: it was not made by Segment, or "
                                 "Segment's output was not saved with the scene (only a .mrb bundle keeps it). Uncheck "
                                 "'Only the slices I edited' for it (the whole volume counts as reviewed)")
    partial, reviewed, slices = partly_reviewed(
        label, label_image(original, volume_node, structures, image, missing_ok=True), f"'{name}'")
    return partial, f"'{name}': learning from the {reviewed} of {slices} slices you edited; the rest is unlabelled."


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
    segmentation_nodes: list[Any] = field(default_factory=list)  # the corrected ones (training and held out)

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
    if not is_grey_volume(volume):
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
        if len(images) < len(pairs) and edited_slices_only(segmentation):  # held-out ones count in full
            label, note = edited_slices_label(segmentation, volume, label_set.structures, image, label)
            notes.append(note)
        present = set(np.unique(sitk.GetArrayViewFromImage(label)).tolist()) - {0, UNREVIEWED}
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
        if not is_grey_volume(volume):
            raise FineTuneInputError(f"Unlabelled volume '{volume.GetName()}' is not a grey-level volume")
        unlabeled.append(image_from_volume_node(volume))
    return FineTuneInputs(images[:len(pairs)], unlabeled, label_set, images[len(pairs):],
                          [f"{s.GetName()} on {v.GetName()}" for s, v in resolved], notes, [s for s, _ in resolved])


# The run


def fine_tune_settings(method: str | None = None, minutes: float | None = None, steps: int | None = None,
                       labeled: int = 1, unlabeled: int = 0) -> TrainSettings:
    """The engine's settings for this choice (no method or 'auto': its default for these counts; no budget: its
    default budget), checked on the main thread so that a bad choice is reported before a worker starts."""
    settings = settings_from(method, steps, minutes, labeled=labeled, unlabeled=unlabeled)
    settings.check(unlabeled)
    return settings


def describe_new_model(inputs: FineTuneInputs, model: str | Path = DEFAULT_MODEL) -> str:
    """What the user is asked to confirm before a new label set is trained: the engine's plan for these inputs
    (its naming, its checks)."""
    plan = plan_fine_tune(model, len(inputs.labeled), len(inputs.unlabeled),
                          label_names=inputs.label_set.label_names)
    parent, target = plan.parent, plan.card
    return (f"The corrected segmentations name {_quoted(inputs.label_set.structures)}, not the labels of "
            f"'{parent.id}' ({_quoted([label.name for label in parent.labels])}).\n\nA new model '{target.id}' "
            f"({target.name}) will be trained with a new output layer, starting from '{parent.id}' "
            f"{parent.version}, which is left unchanged. Its spacing and patch (and a UNet's pooling) are planned from "
            f"your volumes.")


@dataclass
class LogRow:
    """One training step as the worker reported it (the live plot's data)."""

    step: int
    seconds: float
    fraction: float
    loss: float
    losses: dict[str, float]
    learning_rate: float
    validation_dice: float | None

    @classmethod
    def from_record(cls, record: Record) -> LogRow:
        losses = {str(k): float(v) for k, v in (record.get("losses") or {}).items() if v is not None}
        dice = record.get("validation_dice")
        return cls(int(record["step"]), float(record.get("seconds") or 0.0), float(record.get("fraction") or 0.0),
                   float(sum(losses.values())), losses, float(record.get("learning_rate") or 0.0),
                   None if dice is None else float(dice))


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


def _write(image: sitk.Image, path: Path) -> str:
    sitk.WriteImage(image, str(path), useCompression=False)
    return str(path)


class FineTuneTask(WorkerTask):
    """A fine-tuning run in a worker process (``hybridmim finetune``). Construct on the main thread: the inputs
    are written to the worker's private folder and the worker starts. ``poll`` (GUI timer) or ``wait`` advance it;
    ``rows`` are the steps so far, ``result`` the new model folder (already the active version of its id).
    Cancel writes nothing: the worker unwinds on SIGTERM, is killed after a grace period, and the engine only
    renames a complete model folder into place. A run that completes although Cancel was pressed (it was
    already writing the model) reports its result: the new version exists and is active."""

    cancel_discards_result = False

    def __init__(self, inputs: FineTuneInputs, model: str | Path, settings: TrainSettings, device: str = "auto",
                 model_id: str | None = None, seed: int = 0) -> None:
        self.inputs, self.model, self.settings = inputs, Path(model), settings
        self.device, self.model_id, self.seed = device, model_id, seed
        self.rows: list[LogRow] = []
        super().__init__("finetune")

    def arguments(self, folder: Path) -> list[str]:
        inputs, settings = self.inputs, self.settings

        def pairs(kind: str, items: Sequence[tuple[sitk.Image, sitk.Image]]) -> list[str]:
            return [f"{_write(image, folder / f'{kind}-{i + 1}.nrrd')}:"
                    f"{_write(label, folder / f'{kind}-{i + 1}_label.nrrd')}" for i, (image, label) in enumerate(items)]

        arguments = ["finetune", "--model", str(self.model), "--labeled", *pairs("labelled", inputs.labeled),
                     "--method", settings.method, "--device", self.device, "--seed", str(self.seed)]
        if inputs.unlabeled:
            arguments += ["--unlabeled", *(_write(image, folder / f"unlabelled-{i + 1}.nrrd")
                                           for i, image in enumerate(inputs.unlabeled))]
        if inputs.validation:
            arguments += ["--validation", *pairs("validation", inputs.validation)]
        if settings.steps is not None:
            arguments += ["--steps", str(settings.steps)]
        if settings.minutes is not None:
            arguments += ["--minutes", repr(float(settings.minutes))]
        if inputs.label_set.label_names is not None:
            arguments += [f"--labels={name}" for name in inputs.label_set.label_names]  # a name may start with '-'
        if self.model_id:
            arguments += ["--id", self.model_id]
        return arguments

    @property
    def result(self) -> Path | None:
        return Path(self.process.result["folder"]) if self.process.result else None

    def take(self, records: list[Record]) -> None:
        for record in records:
            if record["event"] == "step":
                row = LogRow.from_record(record)
                self.rows.append(row)
                self.fraction, self.message = row.fraction, progress_message(row)
            elif record["event"] == "status":
                self.message = str(record.get("message", ""))

    def wait(self, timeout: float | None = None, progress: Callable[[LogRow], None] | None = None) -> bool:
        """Block until done (True) or ``timeout`` seconds passed (False); ``progress`` gets each new step."""
        seen = len(self.rows)

        def on_records(records: list[Record]) -> None:
            nonlocal seen
            for row in self.rows[seen:] if progress is not None else ():
                progress(row)
            seen = len(self.rows)

        return super().wait(timeout, on_records)

    def finish(self, progress: Callable[[LogRow], None] | None = None) -> Path:
        """Wait (scripts): the new model folder, or the worker's error raised here."""
        self.wait(progress=progress)
        if self.error is not None:
            raise self.error
        return self.result


def prepare_fine_tune(labeled: Sequence[Any], unlabeled_volumes: Sequence[Any] = (), model: str | Path = DEFAULT_MODEL,
                      validation: Sequence[Any] = ()) -> FineTuneInputs:
    """Main thread: read the chosen nodes into engine inputs for ``model`` (id or folder)."""
    return gather_inputs(list(labeled), list(unlabeled_volumes), ModelCard.load(resolve_model(model)),
                         list(validation))


def start_fine_tune_run(inputs: FineTuneInputs, model: str | Path = DEFAULT_MODEL, method: str | None = None,
                        minutes: float | None = None, steps: int | None = None, device: str = "auto",
                        model_id: str | None = None) -> FineTuneTask:
    """Check the choice, mark the segmentations as corrected (Segment never writes into them again) and start."""
    settings = fine_tune_settings(method, minutes, steps, labeled=len(inputs.labeled),
                                  unlabeled=len(inputs.unlabeled))
    task = FineTuneTask(inputs, resolve_model(model), settings, device, model_id)
    for node in inputs.segmentation_nodes:
        mark_corrected(node)
    return task


def fine_tune(labeled: Sequence[Any], unlabeled_volumes: Sequence[Any] = (), model: str | Path = DEFAULT_MODEL,
              method: str | None = None, minutes: float | None = None, steps: int | None = None,
              device: str = "auto", validation: Sequence[Any] = (), model_id: str | None = None,
              progress: Callable[[LogRow], None] | None = None) -> Path:
    """Fine-tune and wait (scripts): the new model folder, already the active version of its id."""
    inputs = prepare_fine_tune(labeled, unlabeled_volumes, model, validation)
    return start_fine_tune_run(inputs, model, method, minutes, steps, device, model_id).finish(progress)


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

