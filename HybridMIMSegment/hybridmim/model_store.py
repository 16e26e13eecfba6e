"""Model folders on disk: where they live, how they are listed, loaded (checksum first) and saved atomically.

A model folder holds ``card.json`` and ``model.safetensors``. Bundled models (read-only) live in the
repository's ``Resources/Models``; trained and fine-tuned models go to the user models folder. Folders sharing an
id are versions of one model; ``active.json`` in the user folder records which version an id means (a fine-tune
makes itself active, a revert picks an earlier one); without an entry the newest version is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ChecksumError, ModelCardError, ModelNotFoundError, OutputError
from .model_card import CARD_FILE, WEIGHTS_FILE, ModelCard
from .staging import probe_new_file, remove_stale_staging

logger = logging.getLogger(__name__)

ACTIVE_FILE = "active.json"
LOCK_FILE = ".lock"
FINE_TUNE_MARK = "-ft."  # versions made by fine-tuning: <base version>-ft.<n>
DEFAULT_MODEL = "hippocampus-cnn"  # what Segment uses when no model is named (CLI, Slicer, scripts)

if TYPE_CHECKING:  # torch is imported where weights are read or written, so listing cards needs no torch
    import torch


BUNDLED_MODELS_MISSING = ("the bundled models were not found: set HYBRIDMIM_BUNDLED_MODELS to the Resources/Models "
                          "folder of a HybridMIMSegment source tree or installed Slicer extension (a pip-installed "
                          "wheel does not carry them)")


def bundled_models_dir() -> Path:
    """``$HYBRIDMIM_BUNDLED_MODELS``, else ``Resources/Models`` of the source tree or of the installed module
    (the Slicer extension installs it next to the ``hybridmim`` folder)."""
    override = os.environ.get("HYBRIDMIM_BUNDLED_MODELS")
    if override:
        return Path(override)
    here = Path(__file__).resolve()
    candidates = [here.parents[2] / "Resources" / "Models", here.parents[1] / "Resources" / "Models"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def user_models_dir() -> Path:
    """``$HYBRIDMIM_USER_MODELS`` or ``~/.hybridmim/models``: trained and fine-tuned models."""
    override = os.environ.get("HYBRIDMIM_USER_MODELS")
    return Path(override) if override else Path.home() / ".hybridmim" / "models"


@dataclass
class ModelFolder:
    path: Path
    card: ModelCard
    bundled: bool


@dataclass
class LoadedModel:
    folder: Path
    card: ModelCard
    network: torch.nn.Module


def scan_models() -> tuple[list[ModelFolder], list[tuple[Path, str]]]:
    """All usable model folders, bundled first, and the folders skipped with the reason: a broken card, or a user
    folder that takes a bundled model's id without being a fine-tune of it (it would silently replace the model
    everyone expects under that id). Hidden folders are save_model's staging areas and are not models."""
    found: list[ModelFolder] = []
    skipped: list[tuple[Path, str]] = []
    bundled_ids: set[str] = set()
    for root, bundled in ((bundled_models_dir(), True), (user_models_dir(), False)):
        if not root.is_dir():
            if bundled:
                skipped.append((root, BUNDLED_MODELS_MISSING))
            continue
        for folder in sorted(p for p in root.iterdir() if not p.name.startswith(".") and p.is_dir()):
            try:
                card = ModelCard.load(folder)
            except ModelCardError as error:
                skipped.append((folder, str(error)))
                continue
            if bundled:
                bundled_ids.add(card.id)
            elif card.id in bundled_ids and FINE_TUNE_MARK not in card.version:
                skipped.append((folder, f"uses the id of the bundled model '{card.id}' without being a fine-tune "
                                        f"of it (version {card.version}); give it another id"))
                continue
            found.append(ModelFolder(folder, card, bundled))
    return found, skipped


def list_models() -> list[ModelFolder]:
    return scan_models()[0]


def resolve_model(model: str | os.PathLike) -> Path:
    """A path to a model folder, or a model id: its active version, else its newest (user over bundled on a tie)."""
    path = Path(model)
    if (path / CARD_FILE).is_file():
        return path
    versions = model_versions(str(model))
    if not versions:
        known = ", ".join(sorted({m.card.id for m in list_models()})) or "none"
        missing = "" if bundled_models_dir().is_dir() else f"; {BUNDLED_MODELS_MISSING}"
        raise ModelNotFoundError(f"No model '{model}' (not a model folder, not a known id). Known models: "
                                 f"{known}{missing}")
    active = active_versions().get(str(model))
    chosen = [m for m in versions if m.card.version == active]
    return (chosen or versions)[-1].path


def _version_key(version: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in version.replace("-", ".").split("."))


def model_versions(model_id: str) -> list[ModelFolder]:
    """Every folder of ``model_id``, oldest version first (bundled before user on a tie)."""
    matches = [m for m in list_models() if m.card.id == model_id]
    return sorted(matches, key=lambda m: (_version_key(m.card.version), not m.bundled))


def next_version(model_id: str, base_version: str) -> str:
    """``<base>-ft.<n>``: the next fine-tune number of ``model_id`` (``base_version`` without any -ft suffix)."""
    base = base_version.split(FINE_TUNE_MARK)[0]
    numbers = [int(v.card.version.rsplit(FINE_TUNE_MARK, 1)[1]) for v in model_versions(model_id)
               if FINE_TUNE_MARK in v.card.version and v.card.version.rsplit(FINE_TUNE_MARK, 1)[1].isdigit()]
    return f"{base}{FINE_TUNE_MARK}{max(numbers, default=0) + 1}"


def active_versions() -> dict[str, str]:
    """id -> version chosen by the user (``active.json``). An unreadable file counts as no choice, with a warning:
    every model then means its newest version until a revert writes the file anew."""
    path = user_models_dir() / ACTIVE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        data = error
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        logger.warning("%s is unreadable or damaged (%s): every model means its newest version; 'hybridmim revert "
                       "ID VERSION' chooses one again", path, str(data)[:100])
        return {}
    return dict(data)


def check_user_models_dir() -> Path:
    """The user models folder exists and accepts new files: checked before a fine-tune spends its budget, so a
    folder that is a file, read-only or on a full disk is refused before training rather than after."""
    root = user_models_dir()
    if root.exists() and not root.is_dir():
        raise OutputError(f"Cannot use the user models folder {root}: it is a file (set HYBRIDMIM_USER_MODELS to a "
                          "folder)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe_new_file(root)
    except OSError as error:
        raise OutputError(f"Cannot use the user models folder {root}: {error}") from error
    return root


@contextmanager
def store_lock() -> Iterator[Path]:
    """Hold the user models folder's lock: numbering, saving and activating versions happen one run at a time
    (two fine-tunes at once must not both take version -ft.3, nor lose each other's active.json entry). Staging
    left by runs killed while saving is removed under it. Yields the folder."""
    root = check_user_models_dir()
    try:
        handle = open(root / LOCK_FILE, "a+b")  # noqa: SIM115 (held across the yield)
    except OSError as error:
        raise OutputError(f"Cannot use the user models folder {root}: {error}") from error
    with handle:
        _lock(handle)
        try:
            remove_stale_staging(root, ".", keep={LOCK_FILE})
            yield root
        finally:
            _unlock(handle)


def _lock(handle) -> None:
    if os.name == "nt":
        import msvcrt

        while True:
            try:
                # retries for about 10 s, then raises (ignore: msvcrt's stubs define it on Windows only)
                msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)  # type: ignore[attr-defined]
                return
            except OSError:
                continue
    import fcntl

    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)


def _unlock(handle) -> None:
    if os.name == "nt":
        import msvcrt

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined]  # Windows-only stubs
    else:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def set_active_version(model_id: str, version: str) -> ModelFolder:
    """Make ``version`` the one ``model_id`` resolves to (revert or re-select); written atomically."""
    with store_lock():
        return _write_active(model_id, version)


def _write_active(model_id: str, version: str) -> ModelFolder:
    chosen = [m for m in model_versions(model_id) if m.card.version == version]
    if not chosen:
        known = ", ".join(m.card.version for m in model_versions(model_id)) or "none"
        raise ModelNotFoundError(f"Model '{model_id}' has no version '{version}' (versions: {known})")
    root = user_models_dir()
    active = {**active_versions(), model_id: version}
    handle, staging = tempfile.mkstemp(prefix=".active.", dir=root)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(active, stream, indent=2)
        os.replace(staging, root / ACTIVE_FILE)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return chosen[-1]


def save_new_version(network: torch.nn.Module, card: ModelCard, base_version: str) -> Path:
    """Save ``network`` as the next fine-tune version of ``card.id`` in the user models folder and make it the
    active one, under the store's lock. Sets ``card.version``."""
    with store_lock() as root:
        card.version = next_version(card.id, base_version)
        try:
            folder = save_model(root / f"{card.id}-{card.version}", network, card)
            _write_active(card.id, card.version)
        except OSError as error:
            raise OutputError(f"Cannot save the new model version in {root}: {error}") from error
    return folder


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_weights(model: str | os.PathLike) -> tuple[Path, ModelCard, dict[str, torch.Tensor]]:
    """A model folder's card and fp32 weights, after verifying the weights against the card's sha256.
    Never unpickles (safetensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = resolve_model(model)
    card = ModelCard.load(folder)
    weights = folder / card.weights["file"]
    if weights.is_symlink() or (weights.exists() and weights.resolve().parent != folder.resolve()):
        raise ModelCardError(f"Model '{card.id}': weights file {weights} leads out of the model folder")
    if not weights.is_file():
        raise ModelNotFoundError(f"Model '{card.id}': weights file {weights} is missing")
    actual = sha256_of(weights)
    if actual != card.weights["sha256"]:
        raise ChecksumError(
            f"Model '{card.id}': weights file {weights} is corrupted or was modified "
            f"(sha256 {actual[:12]}..., card says {card.weights['sha256'][:12]}...). Reinstall or re-export the model."
        )
    try:
        state = load_file(weights)
    except SafetensorError as error:
        raise ChecksumError(f"Model '{card.id}': {weights} is not a valid safetensors file ({error})") from error
    return folder, card, {name: t.float() if t.is_floating_point() else t for name, t in state.items()}


def load_model(model: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a segmentation model folder (checksum verified first)."""
    from .networks import build_network

    folder, card, state = read_weights(model)
    if card.task != "segmentation":
        raise ModelCardError(f"Model '{card.id}' is pre-trained only (no segmentation head): fine-tune it on a few "
                             "labelled volumes first")
    network = build_network(card.architecture["name"], card.in_channels, card.out_channels,
                            **card.architecture.get("args", {}))
    check_weight_values(state, network.state_dict(), card.id)
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise ModelCardError(f"Model '{card.id}': weights do not fit the card's architecture ({error})") from error
    network.to(device).eval()
    return LoadedModel(folder, card, network)


def save_model(folder: Path, weights: torch.nn.Module | Mapping[str, torch.Tensor], card: ModelCard,
               half: bool = False) -> Path:
    """Write weights (a network or a state dict) and card into ``folder`` atomically: a crash leaves either no
    folder or the complete one. ``half`` stores floating-point weights as fp16 (they are loaded back as fp32)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"Model folder {folder} already exists; pick a new version")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        source = weights if isinstance(weights, Mapping) else weights.state_dict()
        state = {
            name: (t.detach().half() if half and t.is_floating_point() else t.detach()).cpu().contiguous()
            for name, t in source.items()
        }
        save_file(state, str(staging / WEIGHTS_FILE))
        card.weights = {"file": WEIGHTS_FILE, "sha256": sha256_of(staging / WEIGHTS_FILE),
                        "dtype": "float16" if half else "float32"}
        card.validate()
        card.save(staging)
        staging.chmod(0o755)  # mkdtemp (and safetensors) make them private; a model folder is meant to be shared
        for written in staging.iterdir():
            written.chmod(0o644)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def initialise_from(network: torch.nn.Module, model: str | os.PathLike,
                    architecture: dict) -> tuple[ModelCard, list[str]]:
    """Copy a model folder's weights (e.g. HybridMIM-pretrained encoder + decoder) into ``network`` wherever name
    and shape match; the rest (the segmentation head) keeps its fresh initialisation. Returns the source card and
    the names left fresh. The architectures must be the same."""
    _, card, state = read_weights(model)
    if card.architecture != architecture:
        raise ModelCardError(f"Model '{card.id}' has architecture {card.architecture}, not {architecture}")
    return card, load_matching(network, state, card.id)


def check_weight_values(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights the network would take silently but cannot use: integer or boolean tensors where it holds
    floating-point ones (load_state_dict casts them), and NaN or infinite values (every label would be empty)."""
    import torch

    mistyped = [name for name, tensor in state.items()
                if name in own and tensor.is_floating_point() != own[name].is_floating_point()]
    if mistyped:
        raise ModelCardError(f"Model '{source}': weights {', '.join(mistyped[:3])} are {state[mistyped[0]].dtype}, "
                             f"not {own[mistyped[0]].dtype}")
    broken = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise ModelCardError(f"Model '{source}': weights {', '.join(broken[:3])} contain NaN or infinite values")


def load_matching(network: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str,
                  skip: frozenset[str] = frozenset()) -> list[str]:
    """Load the weights of ``state`` whose name and shape match ``network``'s, except ``skip`` (e.g. an output
    layer being re-made); returns the names left at their fresh initialisation."""
    own = network.state_dict()
    check_weight_values(state, own, source)
    matching = {name: tensor for name, tensor in state.items()
                if name in own and name not in skip and own[name].shape == tensor.shape}
    if len(matching) < 0.9 * len(own):
        raise ModelCardError(f"Model '{source}' provides only {len(matching)} of {len(own)} weights")
    network.load_state_dict(matching, strict=False)
    return sorted(set(own) - set(matching))
