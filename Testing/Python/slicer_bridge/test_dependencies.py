"""The Slicer module's dependency check: versions come from package metadata (torch and MONAI are never imported
in Slicer's process), and torch is held to what the installed MONAI declares."""

from __future__ import annotations

import subprocess
import sys

import pytest
from packaging.requirements import Requirement

from conftest import REPO

pytest.importorskip("slicer", reason="slicer-core is installed by the test set-up (./setup.sh test)")

from HybridMIMSegmentLib.dependencies import (  # noqa: E402
    installed_version,
    missing_packages,
    torch_requirement,
    unmet,
    worker_requirements,
)


def test_torch_is_held_to_what_monai_declares():
    import importlib.metadata

    declared = [Requirement(r) for r in importlib.metadata.requires("monai")]
    expected = next(r for r in declared if r.name == "torch"
                    and (r.marker is None or r.marker.evaluate({"extra": ""})))
    assert torch_requirement() == expected


def test_platform_specific_torch_requirements_are_honoured(monkeypatch):
    """MONAI 1.5 declares torch only behind platform markers; the one for this platform applies."""
    import importlib.metadata
    import platform

    import HybridMIMSegmentLib.dependencies as dependencies

    declared = ["numpy>=1.24", "torch>=2.4.1; platform_system != 'Windows'",
                "torch!=2.7.0,>=2.4.1; platform_system == 'Windows'", "torch>=9; extra == 'all'"]
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: declared)
    expected = "torch!=2.7.0,>=2.4.1" if platform.system() == "Windows" else "torch>=2.4.1"
    assert str(dependencies.torch_requirement()).split(";")[0].replace(" ", "") == expected


def test_unmet_says_what_and_why():
    assert unmet(Requirement("torch>=1.0")) is None
    assert "installed: " in unmet(Requirement("torch<1.0"))
    assert unmet(Requirement("no-such-package-hybridmim>=1")).endswith("(not installed)")


def test_this_environment_has_everything_the_worker_needs():
    assert missing_packages() == []
    assert all(installed_version(requirement.name) for requirement in worker_requirements())


def test_the_worker_installs_the_engine_requirements_but_slicers_own_packages():
    """One list of versions: the pip package's metadata and the Slicer installer agree."""
    import importlib.metadata

    names = {r.name.lower() for r in worker_requirements()}
    assert {"monai", "safetensors", "slicerio", "einops"} <= names and not names & {"torch", "numpy", "simpleitk"}
    declared = {Requirement(text).name.lower(): Requirement(text).specifier
                for text in importlib.metadata.requires("hybridmim-segment") if "extra" not in text}
    assert all(declared[r.name.lower()] == r.specifier for r in worker_requirements())


def test_checking_imports_neither_torch_nor_monai():
    code = ("import sys; sys.path.insert(0, 'HybridMIMSegment'); "
            "from HybridMIMSegmentLib.dependencies import missing_packages; missing_packages(); "
            "import HybridMIMSegmentLib.segmenting, HybridMIMSegmentLib.finetuning, HybridMIMSegmentLib.plotting; "
            "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout
    assert out.strip() == "[]"
