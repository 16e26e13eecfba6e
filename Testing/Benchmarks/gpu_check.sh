#!/usr/bin/env bash
# The GPU check: one run on a GPU machine, under 10 minutes, from the repository root.
#   inference (GPU default precision and fp32 vs the CPU), one default fine-tuning round, the training step in
#   fp32 vs bf16, 50 HybridMIM pre-training steps per backbone.
# Dry run on a CPU (a few steps of each, same code paths):  bash Testing/Benchmarks/gpu_check.sh --dry-run
#
# On a GPU machine without network access, bring the wheels it lacks in .whl/ (installed from there when present):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl "monai==$(python -c 'import monai; print(monai.__version__)')" \
#     "SimpleITK==$(python -c 'import SimpleITK; print(SimpleITK.__version__)')" slicerio einops   # about 54 MB
# The check uses only the la-cnn model (the others may be left out of the copy to keep it small).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = "--dry-run" ]; then
  device=cpu; finetune=(--steps 3); train=(--steps 2); pretrain=(--steps 1 --batch 1 --backbones "cnn (BasicUNet 32..512)")
else
  device=cuda; finetune=(); train=(--steps 20); pretrain=(--steps 50)
fi
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site .
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
echo "== inference and one default fine-tuning round"
python3 Testing/Benchmarks/gpu_inference_and_finetune.py --device "$device" "${finetune[@]}"
echo "== training step, fp32 vs bf16"
python3 Testing/Benchmarks/benchmark_training_step.py --device "$device" --model la-cnn "${train[@]}"
echo "== HybridMIM pre-training steps"
python3 Testing/Benchmarks/benchmark_pretraining.py --device "$device" "${pretrain[@]}"
