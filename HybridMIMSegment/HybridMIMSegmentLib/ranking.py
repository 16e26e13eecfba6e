"""Rank volume nodes by how unsure a model is about them, in a worker process: the first is the one worth
correcting next.

Main thread only (MRML). Each volume is written with its exact geometry to the worker's private folder and the
worker (``hybridmim rank``) segments them (writing nothing) and reports each volume's uncertainty; the scene is
never changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import SimpleITK as sitk

from hybridmim.errors import HybridMIMError
from hybridmim.model_card import ModelCard
from hybridmim.model_store import DEFAULT_MODEL, resolve_model

from .mrml_bridge import image_from_volume_node, is_grey_volume
from .worker import Record, WorkerTask


def candidate_volumes(scene) -> list:
    """The scene's volumes a user could correct: grey (single-component, not label map) volumes shown in editors."""
    nodes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    candidates = [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]
    return [node for node in candidates if is_grey_volume(node) and not node.GetHideFromEditors()]


class RankTask(WorkerTask):
    """One ranking run: construct on the main thread (it writes the volumes and starts the worker), ``poll`` or
    ``wait``, then ``ranking()``."""

    def __init__(self, volume_nodes: Sequence, model_folder: str | Path, device: str = "auto") -> None:
        if not volume_nodes:
            raise HybridMIMError("Choose the volumes to rank")
        self.model_folder = Path(model_folder)
        self.card = ModelCard.load(self.model_folder)
        if self.card.task != "segmentation":
            raise HybridMIMError(f"Model '{self.card.id}' is pre-trained only: it cannot rank volumes")
        self.volume_nodes, self.device = list(volume_nodes), device
        super().__init__("rank")

    def arguments(self, folder: Path) -> list[str]:
        self.paths = []
        for index, node in enumerate(self.volume_nodes):
            path = folder / f"volume-{index}.nrrd"
            sitk.WriteImage(image_from_volume_node(node), str(path), useCompression=False)
            self.paths.append(str(path))
        return ["rank", *self.paths, "--model", str(self.model_folder), "--device", self.device]

    def take(self, records: list[Record]) -> None:
        for record in records:
            if record["event"] == "progress":
                self.fraction, self.message = float(record.get("fraction") or 0.0), "Ranking the volumes"

    @property
    def error(self) -> BaseException | None:
        """The worker's error, naming volume nodes instead of the worker's temporary files."""
        error = self.process.error
        if error is None:
            return None
        text = str(error)
        for path, node in zip(self.paths, self.volume_nodes):
            text = text.replace(path, f"volume '{node.GetName()}'")
        return error if text == str(error) else HybridMIMError(text)

    def ranking(self) -> list[tuple[object, float]]:
        """(volume node, uncertainty), most uncertain first, for the volumes still in the scene; raises the
        worker's error."""
        if self.error is not None:
            raise self.error
        if self.process.result is None:
            raise HybridMIMError("Ranking has not finished yet")
        nodes = dict(zip(self.paths, self.volume_nodes))
        ranked = [(nodes[entry["volume"]], float(entry["uncertainty"] or 0.0))
                  for entry in self.process.result["ranking"]]
        return [(node, score) for node, score in ranked if node.GetScene() is not None]


def start_rank(volume_nodes: Sequence, model: str | Path = DEFAULT_MODEL, device: str = "auto") -> RankTask:
    """Start ranking ``volume_nodes`` with ``model`` (an id, which means its active version, or a folder)."""
    return RankTask(volume_nodes, resolve_model(model), device)


def rank(volume_nodes: Sequence, model: str | Path = DEFAULT_MODEL, device: str = "auto") -> list[tuple[object, float]]:
    """Rank and wait (scripts): (volume node, uncertainty), most uncertain first."""
    task = start_rank(volume_nodes, model, device)
    task.wait()
    return task.ranking()
