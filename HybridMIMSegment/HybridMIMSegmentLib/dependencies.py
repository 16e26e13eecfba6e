"""Python packages the worker process needs, installed into Slicer's Python once, on request, never at import time.

torch comes from the PyTorch extension (PyTorchUtils picks the CUDA build that fits the driver), at a version the
installed MONAI accepts; the other packages from PyPI, without replacing Slicer's own numpy or SimpleITK. Versions
are read from package metadata: Slicer's process never imports torch or MONAI (the worker does).

One confirmation in the GUI; none in headless or testing runs, where the packages are installed (not skipped:
a test of the module needs them).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from pathlib import Path

import slicer
from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

logger = logging.getLogger(__name__)

#: The engine's one list of requirements (pyproject.toml reads the same file), shipped with the engine.
REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "hybridmim" / "requirements.txt"
#: Not installed from PyPI here: numpy and SimpleITK are Slicer's own, torch comes from the PyTorch extension.
SLICER_OWNED = {"numpy", "simpleitk", "torch", "vtk"}
#: torch when MONAI is not installed yet: what MONAI 1.6, the newest the engine accepts, declares (older MONAI in
#: the range want less), so torch is installed once. (PyTorchUtils imports torch in Slicer's process while it
#: installs it: the one time it is there.)
TORCH_FALLBACK = "torch>=2.8"


def worker_requirements() -> list[Requirement]:
    """What the worker needs from PyPI in Slicer's Python: the engine's requirements but Slicer's own packages."""
    lines = REQUIREMENTS_FILE.read_text(encoding="utf-8").splitlines()
    requirements = [Requirement(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [r for r in requirements if r.name.lower() not in SLICER_OWNED]


def installed_version(distribution: str) -> Version | None:
    try:
        return Version(importlib.metadata.version(distribution))
    except (importlib.metadata.PackageNotFoundError, InvalidVersion):
        return None


def torch_requirement() -> Requirement:
    """The torch the installed MONAI declares for this platform (requirements whose environment marker holds
    here, outside extras), else ``TORCH_FALLBACK``."""
    try:
        declared = importlib.metadata.requires("monai") or []
    except importlib.metadata.PackageNotFoundError:
        declared = []
    for text in declared:
        requirement = Requirement(text)
        if requirement.name == "torch" and (requirement.marker is None
                                            or requirement.marker.evaluate({"extra": ""})):
            return requirement
    return Requirement(TORCH_FALLBACK)


def unmet(requirement: Requirement) -> str | None:
    """Why ``requirement`` is not met now (None when it is)."""
    version = installed_version(requirement.name)
    if version is None:
        return f"{requirement} (not installed)"
    if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
        return f"{requirement} (installed: {version})"
    return None


def missing_packages() -> list[str]:
    """Each requirement that is not met, with why; torch first."""
    reasons = [unmet(torch_requirement()), *(unmet(requirement) for requirement in worker_requirements())]
    return [reason for reason in reasons if reason]


def should_ask() -> bool:
    """Ask only a person at the GUI: not in headless (--no-main-window) or testing runs."""
    app = slicer.app
    return not app.testingEnabled() and not app.commandOptions().noMainWindow


def ensure_dependencies(ask: bool | None = None) -> bool:
    """Install what is missing after one confirmation (``ask`` None: only in the GUI). False when declined."""
    missing = missing_packages()
    if not missing:
        return True
    if ask is None:
        ask = should_ask()
    if ask and not slicer.util.confirmOkCancelDisplay(
            "HybridMIMSegment needs these Python packages, which will be installed now (this may take several "
            "minutes and needs internet once):\n\n" + "\n".join(missing), "Install Python packages?"):
        return False
    with slicer.util.WaitCursor():
        if unmet(torch_requirement()):  # first: MONAI's own install must not pull a torch from PyPI
            _install_torch(torch_requirement())
        _pip_install([str(requirement) for requirement in worker_requirements() if unmet(requirement)])
    still_missing = missing_packages()
    if still_missing:
        raise RuntimeError("These packages could not be installed: " + "; ".join(still_missing) + ". For torch, "
                           "use the 'PyTorch Util' module to install a matching version, then restart Slicer.")
    return True


def _install_torch(requirement: Requirement) -> None:
    try:
        import PyTorchUtils
    except ModuleNotFoundError as error:
        raise RuntimeError("HybridMIMSegment needs the PyTorch extension: install 'PyTorch' from the Extensions "
                           "Manager, restart Slicer, and try again.") from error
    logger.info("Installing %s through the PyTorch extension", requirement)
    installed = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                               torchVersionRequirement=str(requirement.specifier))
    if installed is None:
        raise RuntimeError(f"PyTorch ({requirement}) was not installed; use the 'PyTorch Util' module to install "
                           "it, then restart Slicer.")


def _pip_install(requirements: list[str]) -> None:
    if not requirements:
        return
    try:
        pip_ensure = importlib.import_module("slicer.packaging").pip_ensure  # Slicer 5.12+
    except (ImportError, AttributeError):
        slicer.util.pip_install(requirements)
        return
    # asked already (or not to be asked); installed under --testing too; nothing imported, so no restart needed
    pip_ensure([Requirement(text) for text in requirements], skip_packages=SLICER_OWNED, prompt_install=False,
               prompt_restart=False, skip_in_testing=False, requester="HybridMIMSegment")
