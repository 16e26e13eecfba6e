"""Layer 3: the module self-test in a real Slicer, run only where SLICER_EXECUTABLE points at one."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import REPO


@pytest.mark.skipif(not os.environ.get("SLICER_EXECUTABLE"), reason="SLICER_EXECUTABLE not set (no Slicer here)")
def test_module_selftest_passes_in_headless_slicer():
    result = subprocess.run([str(REPO / "Testing" / "Slicer" / "run_selftest.sh")], capture_output=True, text=True,
                            encoding="utf-8", errors="replace",
                            timeout=2000)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "HybridMIMSegment self-test passed" in result.stdout
