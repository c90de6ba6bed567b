#!/usr/bin/env bash
# GPU smoke check for a session lent a GPU machine (device tool), under 5 minutes: training steps
# and scoring with bf16 autocast on CUDA, images/s for both, and the CPU for the ratio.
#   run: bash benchmarks/gpu_smoke.sh   (torch, torchvision, pyarrow, pillow: all in the GPU image)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 benchmarks/gpu_smoke.py --steps 300 --cpu-steps 10 --arch resnet18 --size 64
