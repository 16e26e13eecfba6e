"""Run the HybridMIMSegment module self-test inside a real (headless) Slicer, as Slicer's ctest does: each
``test_*`` method of ``HybridMIMSegmentTest`` on its own, with ``setUp``/``tearDown``. Exits with its status.

    "$SLICER_EXECUTABLE" --no-splash --no-main-window --testing \
        --additional-module-paths HybridMIMSegment --python-script Testing/Slicer/run_selftest.py

Testing/Slicer/run_selftest.sh does exactly this, with a time limit; ``./setup.sh test`` runs it when
SLICER_EXECUTABLE is set. The test's setUp installs missing Python packages without asking (torch through the
PyTorch extension) and points HYBRIDMIM_USER_MODELS at a temporary folder, so the user's models are not touched.
"""

import sys
import unittest

import slicer

import HybridMIMSegment

suite = unittest.TestLoader().loadTestsFromTestCase(HybridMIMSegment.HybridMIMSegmentTest)
result = unittest.TextTestRunner(stream=sys.stdout, verbosity=2).run(suite)
print("HybridMIMSegment self-test passed" if result.wasSuccessful() else "HybridMIMSegment self-test FAILED")
sys.stdout.flush()
slicer.util.exit(0 if result.wasSuccessful() else 1)
