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

from .mrml_bridge import image_from_volume_node
from .worker import Record, WorkerTask


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

    def ranking(self) -> list[tuple[object, float]]:
        """(volume node, uncertainty), most uncertain first; raises the worker's error."""
        if self.process.error is not None:
            raise self.process.error
        if self.process.result is None:
            raise HybridMIMError("Ranking has not finished yet")
        nodes = dict(zip(self.paths, self.volume_nodes))
        return [(nodes[entry["volume"]], float(entry["uncertainty"])) for entry in self.process.result["ranking"]]


def start_rank(volume_nodes: Sequence, model: str | Path = DEFAULT_MODEL, device: str = "auto") -> RankTask:
    """Start ranking ``volume_nodes`` with ``model`` (an id, which means its active version, or a folder)."""
    return RankTask(volume_nodes, resolve_model(model), device)


def rank(volume_nodes: Sequence, model: str | Path = DEFAULT_MODEL, device: str = "auto") -> list[tuple[object, float]]:
    """Rank and wait (scripts): (volume node, uncertainty), most uncertain first."""
    task = start_rank(volume_nodes, model, device)
    task.wait()
    return task.ranking()
