"""Python packages the engine needs inside Slicer, installed once, on request, never at import time.

torch comes from the PyTorch extension (PyTorchUtils picks the CUDA build that fits the driver); the other
packages from PyPI, without replacing Slicer's own numpy or SimpleITK.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

import slicer

logger = logging.getLogger(__name__)

#: import name -> pip requirement of what the engine uses in Slicer (the CLI's tqdm/pillow are not needed).
#: numpy and SimpleITK are Slicer's own and never installed here.
REQUIREMENTS = {
    "monai": "monai>=1.4,<1.7",
    "safetensors": "safetensors>=0.4",
    "slicerio": "slicerio>=1.4",
    "einops": "einops>=0.7",
}
SLICER_OWNED = ["numpy", "SimpleITK", "torch", "vtk"]
MINIMUM_TORCH = "2.3"


def missing_packages() -> list[str]:
    """Requirements that are not importable now (torch reported by its import name)."""
    missing = [] if importlib.util.find_spec("torch") else ["torch"]
    return missing + [req for name, req in REQUIREMENTS.items() if importlib.util.find_spec(name) is None]


def ensure_dependencies(ask: bool = True) -> bool:
    """Install what is missing after one confirmation. Returns False when the user declines."""
    missing = missing_packages()
    if not missing:
        return True
    if ask and not slicer.util.confirmOkCancelDisplay(
            "HybridMIMSegment needs these Python packages, which will be installed now (this may take several "
            f"minutes and needs internet once):\n\n{', '.join(missing)}",
            "Install Python packages?"):
        return False
    if "torch" in missing:
        _install_torch()
    others = [req for req in missing if req != "torch"]
    if others:
        with slicer.util.WaitCursor():
            _pip_install(others)
    still_missing = missing_packages()
    if still_missing:
        raise RuntimeError(f"These packages could not be installed: {', '.join(still_missing)}")
    return True


def _install_torch() -> None:
    try:
        import PyTorchUtils
    except ModuleNotFoundError as error:
        raise RuntimeError("HybridMIMSegment needs the PyTorch extension: install 'PyTorch' from the Extensions "
                           "Manager, restart Slicer, and try again.") from error
    torch_logic = PyTorchUtils.PyTorchUtilsLogic()
    if not torch_logic.torchInstalled():
        logger.info("Installing PyTorch through the PyTorch extension")
        if torch_logic.installTorch(askConfirmation=False, torchVersionRequirement=f">={MINIMUM_TORCH}") is None:
            raise RuntimeError("PyTorch was not installed; use the 'PyTorch Util' module to install it.")


def _pip_install(requirements: list[str]) -> None:
    packaging = _slicer_packaging()
    if packaging is not None and hasattr(packaging, "pip_ensure"):  # Slicer 5.11+
        from packaging.requirements import Requirement

        packaging.pip_ensure([Requirement(r) for r in requirements], skip_packages=SLICER_OWNED,
                             requester="HybridMIMSegment")
    else:
        slicer.util.pip_install(requirements)


def _slicer_packaging():
    """Slicer's package helper module: ``slicer.packaging`` (current) or ``slicer.pydeps`` (5.11)."""
    for name in ("slicer.packaging", "slicer.pydeps"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None
