#!/usr/bin/env bash
# Scoring on a lent GPU machine (device tool): end-to-end images/s from encoded shards vs the
# forward-only ceiling, bf16 autocast, DataLoader workers decoding beside the GPU. About 5 minutes.
#   run: bash benchmarks/gpu_score.sh   (needs torch, torchvision, pyarrow, pillow: all in the GPU image)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# a photo-sized workload: resnet50 on 224x224 JPEGs
python3 benchmarks/bench_score.py --synthetic --format jpeg --arch resnet50 --size 224 --channels 3 \
  --images 12000 --batch-size 256 --shard-size 1000 --workers 4,8,14
# the demo's workload: cnn_medium on 28x28 grayscale PNGs (decode-bound: the model is tiny)
python3 benchmarks/bench_score.py --synthetic --images 100000 --batch-size 1024 --shard-size 5000 --workers 4,8,14
