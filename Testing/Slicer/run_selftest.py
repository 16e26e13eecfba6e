"""Run the HybridMIMSegment module self-test inside a real (headless) Slicer and exit with its status.

    "$SLICER_EXECUTABLE" --no-splash --no-main-window \
        --additional-module-paths HybridMIMSegment --python-script Testing/Slicer/run_selftest.py

Testing/Slicer/run_selftest.sh does exactly this; ``./setup.sh test`` runs it when SLICER_EXECUTABLE is set.
The self-test installs missing Python packages without asking (torch through the PyTorch extension). Besides
Segment it fine-tunes the bundled model for a few steps (script API and module panel: live plot, new version
selected, revert), with HYBRIDMIM_USER_MODELS pointed at a temporary folder for the duration.
"""

import traceback

import slicer

try:
    import HybridMIMSegment

    HybridMIMSegment.HybridMIMSegmentTest().runTest()
except Exception:
    traceback.print_exc()
    print("HybridMIMSegment self-test FAILED")
    slicer.util.exit(1)
else:
    print("HybridMIMSegment self-test passed")
    slicer.util.exit(0)
