#!/usr/bin/env bash
# Runs the module self-test in headless Slicer (5.10 or newer) and exits with its status.
#   SLICER_EXECUTABLE            the Slicer launcher (required)
#   HYBRIDMIM_SELFTEST_TIMEOUT   seconds before the run is stopped (default 1800)
#   HYBRIDMIM_EXTRA_MODULE_PATHS more module folders to load, e.g. the PyTorch extension's
#                                ".../PyTorch/lib/Slicer-5.x/qt-scripted-modules": --testing ignores the user's
#                                settings, so installed extensions are not loaded. Without it, torch must already
#                                be installed in Slicer's Python (for example by using the module once).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ -z "${SLICER_EXECUTABLE:-}" ]]; then
  echo "SLICER_EXECUTABLE is not set: point it at the Slicer launcher to run the in-Slicer self-test." >&2
  exit 2
fi
# Linux without a display: the test opens dialogs and a plot widget, so give it a virtual one
display=()
if [[ "$(uname)" == Linux && -z "${DISPLAY:-}" ]] && command -v xvfb-run >/dev/null; then display=(xvfb-run -a); fi
paths="$PWD/HybridMIMSegment"
[[ -n "${HYBRIDMIM_EXTRA_MODULE_PATHS:-}" ]] && paths="$paths $HYBRIDMIM_EXTRA_MODULE_PATHS"
# a time limit: coreutils timeout (gtimeout on macOS with Homebrew coreutils); without one, a warning
limit=()
for tool in timeout gtimeout; do
  if command -v "$tool" >/dev/null; then limit=("$tool" --kill-after=30 "${HYBRIDMIM_SELFTEST_TIMEOUT:-1800}"); break; fi
done
[[ ${#limit[@]} -gt 0 ]] || echo "warning: no 'timeout' command: the self-test runs without a time limit" >&2
# shellcheck disable=SC2086  # several paths, space-separated, as Slicer takes them
exec ${limit[@]+"${limit[@]}"} ${display[@]+"${display[@]}"} "$SLICER_EXECUTABLE" --no-splash --no-main-window \
  --testing --additional-module-paths $paths --python-script "$PWD/Testing/Slicer/run_selftest.py"
