#!/usr/bin/env bash
# Runs the module self-test in headless Slicer. Needs SLICER_EXECUTABLE (the Slicer launcher, 5.10 or newer)
# with the PyTorch extension installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ -z "${SLICER_EXECUTABLE:-}" ]]; then
  echo "SLICER_EXECUTABLE is not set: point it at the Slicer launcher to run the in-Slicer self-test." >&2
  exit 2
fi
exec "$SLICER_EXECUTABLE" --no-splash --no-main-window \
  --additional-module-paths "$PWD/HybridMIMSegment" --python-script "$PWD/Testing/Slicer/run_selftest.py"
