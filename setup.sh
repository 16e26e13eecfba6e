#!/usr/bin/env bash
# Set up HybridMIMSegment in a virtual environment and run the demo or the test suite.
#
#   ./setup.sh demo   segment the shipped sample with the bundled model (.seg.nrrd + PNG preview)
#   ./setup.sh test   run the linter (ruff), the type checker on the engine (mypy) and the whole test suite (pytest)
#
# PyTorch: on a machine without an NVIDIA GPU this installs the CPU build torch==2.13.0; with a GPU, the newest
# CUDA build from PyPI. Override with HYBRIDMIM_TORCH_SPEC (e.g. "torch==2.5.1"). An existing torch is kept.
# HYBRIDMIM_VENV picks the environment folder (default .venv); PYTHON picks the interpreter (>= 3.10).
set -euo pipefail
cd "$(dirname "$0")"

task=${1:-}
if [[ "$task" != demo && "$task" != test ]]; then
  echo "usage: ./setup.sh demo|test" >&2
  exit 2
fi

python=${PYTHON:-python3}
venv=${HYBRIDMIM_VENV:-.venv}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "Python >= 3.10 is required ($python is $("$python" --version 2>&1))" >&2; exit 2; }
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"

if ! python -c 'import torch' 2>/dev/null; then
  if [[ -n "${HYBRIDMIM_TORCH_SPEC:-}" ]]; then
    torch_spec=$HYBRIDMIM_TORCH_SPEC
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    torch_spec=torch
  else
    torch_spec=torch==2.13.0
  fi
  echo "Installing $torch_spec ..."
  python -m pip install -q "$torch_spec"
fi

if [[ "$task" == demo ]]; then
  python -m pip install -q -e .
  mkdir -p out
  hybridmim segment Resources/Samples/hippocampus_017.nii.gz -o out/hippocampus_017.seg.nrrd \
    --preview out/hippocampus_017.png
else
  python -m pip install -q -e ".[test]"
  ruff check .
  mypy
  python -m pytest "${@:2}"
fi
