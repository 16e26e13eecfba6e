"""Shared paths and fixtures. Tests run on real data: the shipped sample and ../shared/data beside the repo."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "Resources" / "Samples"
SAMPLE_IMAGE = SAMPLES / "hippocampus_017.nii.gz"
SAMPLE_LABEL = SAMPLES / "hippocampus_017.label.nii.gz"
BUNDLED_MODEL = REPO / "Resources" / "Models" / "hippocampus-cnn"
SHARED_DATA = Path(os.environ.get("HYBRIDMIM_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use ../shared/data are marked ``shared_data`` (``-m "not shared_data"`` runs the rest)."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared_data)


@pytest.fixture(autouse=True)
def isolated_user_models(tmp_path_factory, monkeypatch):
    """Never read or write the real user models folder from a test."""
    monkeypatch.setenv("HYBRIDMIM_USER_MODELS", str(tmp_path_factory.mktemp("user_models")))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set HYBRIDMIM_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def segmenter():
    from hybridmim.inference import Segmenter

    return Segmenter(BUNDLED_MODEL, device="cpu")


@pytest.fixture
def model_copy(tmp_path) -> Path:
    """A writable copy of the bundled model folder, for tests that damage it."""
    return Path(shutil.copytree(BUNDLED_MODEL, tmp_path / "model"))


@pytest.fixture
def scene():
    """An empty MRML scene (slicer-core)."""
    slicer = pytest.importorskip("slicer", reason="slicer-core is installed by the test set-up (./setup.sh test)")
    return slicer.vtkMRMLScene()
