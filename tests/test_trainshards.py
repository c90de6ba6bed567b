"""Training shards: the selected set materialised as shuffled raw-pixel parts, and the stream that trains from them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from semisup_tasks.images import decode, encode_png, write_shards
from semisup_tasks.models import build_model
from semisup_tasks.store import Store
from semisup_tasks.train import Recipe, predict, train, train_stream
from semisup_tasks.trainshards import ShardStream, write_training_shards

SIZE = (8, 8)  # the sources are 12x12: materialising also resizes


def bar_image(rng: np.random.Generator, cls: int) -> np.ndarray:
    """12x12 noise with a bright vertical bar whose position is the class: distinct pixels, learnable labels."""
    img = rng.integers(0, 60, (12, 12), dtype=np.uint8)
    img[:, 1 + cls * 4:3 + cls * 4] = 255
    return img


def make_source(store: Store, n: int = 30, shard_size: int = 10, seed: int = 0) -> tuple[list[str], dict]:
    """PNG shards of n images; returns the shard keys and {image_id: (shard, png bytes, class)}."""
    rng = np.random.default_rng(seed)
    images = {f"img-{i:03d}": (encode_png(bar_image(rng, i % 3)), i % 3) for i in range(n)}
    shards = write_shards(store, "drops/d1/shards", ((k, b, None) for k, (b, _) in images.items()), shard_size)
    where = {}
    for s in shards:
        for image_id in store.read_table(s.key, columns=["image_id"]).column("image_id").to_pylist():
            where[image_id] = (s.key, images[image_id][0], images[image_id][1])
    return [s.key for s in shards], where


def selection(where: dict, extra: dict[str, int] | None = None) -> pa.Table:
    """Every image with its class, sorted by class then id (as a selection comes), plus extra (id, class) rows."""
    rows = sorted((c, i) for i, (_, _, c) in where.items()) + sorted((c, i) for i, c in (extra or {}).items())
    return pa.table({"image_id": [i for _, i in rows], "shard": [where[i][0] for _, i in rows],
                     "cls": pa.array([c for c, _ in rows], pa.int64())})


def read_parts(store: Store, manifest: dict) -> pa.Table:
    return pa.concat_tables([store.read_table(p["key"]) for p in manifest["parts"]])


@pytest.fixture
def store(tmp_path):
    return Store.from_uri(f"file://{tmp_path}/store")


def test_every_selected_row_appears_once_with_its_pixels_and_label(store):
    _, where = make_source(store)
    rows = selection(where, extra={"img-004": 2, "img-010": 0})  # selected for a second class too
    m = write_training_shards(store, "runs/r/trainshards", rows, 1, SIZE, seed=1, part_rows=7)
    assert m["count"] == 32 and [p["count"] for p in m["parts"]] == [7, 7, 7, 7, 4]
    assert m["channels"] == 1 and m["image_size"] == [8, 8] and m["seed"] == 1
    out = read_parts(store, m)
    assert out.schema.field("pixels").type == pa.binary(64) and out.schema.field("label").type == pa.int32()
    got = sorted(zip(out.column("image_id").to_pylist(), out.column("label").to_pylist(), strict=True))
    assert got == sorted(zip(rows.column("image_id").to_pylist(), rows.column("cls").to_pylist(), strict=True))
    assert ("img-004", 1) in got and ("img-004", 2) in got
    for image_id, pixels in zip(out.column("image_id").to_pylist(), out.column("pixels").to_pylist(), strict=True):
        assert pixels == decode(where[image_id][1], 1, SIZE).tobytes()


def test_rgb_pixels_are_channels_first(store):
    _, where = make_source(store, n=6)
    m = write_training_shards(store, "ts", selection(where), 3, (12, 12), seed=0)
    out = read_parts(store, m)
    x, _ = ShardStream(store, "ts").read_part(*[(p["key"], p["count"]) for p in m["parts"]][0])
    assert x.shape == (6, 3, 12, 12)
    for image_id, arr in zip(out.column("image_id").to_pylist(), x, strict=True):
        assert np.array_equal(arr, decode(where[image_id][1], 3, (12, 12)))


def test_order_is_shuffled_and_fixed_by_the_seed(store):
    _, where = make_source(store)
    rows = selection(where)

    def order(prefix, seed):
        m = write_training_shards(store, prefix, rows, 1, SIZE, seed=seed, part_rows=8)
        return read_parts(store, m).column("image_id").to_pylist()

    a, b, c = order("a", 7), order("b", 7), order("c", 8)
    assert a == b != c
    assert a != rows.column("image_id").to_pylist() and a != sorted(a)
    labels = [where[i][2] for i in a]
    assert labels != sorted(labels)


def test_spilled_buckets_give_the_same_parts_as_one_bucket(store, monkeypatch):
    _, where = make_source(store)
    rows = selection(where, extra={"img-004": 2})
    one = write_training_shards(store, "one", rows, 1, SIZE, seed=3, part_rows=5)
    written = []
    write_bytes = store.write_bytes
    monkeypatch.setattr(store, "write_bytes", lambda key, data: (written.append(key), write_bytes(key, data)))
    spilled = write_training_shards(store, "spilled", rows, 1, SIZE, seed=3, part_rows=5, bucket_rows=3,
                                    spill_bytes=1)
    assert [p["count"] for p in one["parts"]] == [p["count"] for p in spilled["parts"]]
    assert read_parts(store, one).equals(read_parts(store, spilled))
    spills = [k for k in written if k.startswith("spilled/_spill/")]
    assert len(spills) > 11  # 11 buckets, several source shards each
    assert store.list("spilled/_spill") == []  # spill objects are removed once their bucket is written
    # shards decoding on several threads (and many in flight) still write the same parts
    threaded = write_training_shards(store, "threaded", rows, 1, SIZE, seed=3, part_rows=5, bucket_rows=3,
                                     spill_bytes=1, threads=3)
    assert read_parts(store, threaded).equals(read_parts(store, one))
    single = write_training_shards(store, "single", rows, 1, SIZE, seed=3, part_rows=5, threads=1)
    assert read_parts(store, single).equals(read_parts(store, one))


def test_rerun_is_a_no_op_and_other_rows_rewrite(store, tmp_path):
    _, where = make_source(store)
    rows = selection(where)
    first = write_training_shards(store, "ts", rows, 1, SIZE, seed=0, part_rows=4)
    files = sorted((tmp_path / "store" / "ts").iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    assert write_training_shards(store, "ts", rows, 1, SIZE, seed=0, part_rows=4) == first
    assert [f.stat().st_mtime_ns for f in sorted((tmp_path / "store" / "ts").iterdir())] == stamps

    fewer = rows.slice(0, 10)  # other rows: rewritten, and the old extra parts are gone
    m = write_training_shards(store, "ts", fewer, 1, SIZE, seed=0, part_rows=4)
    assert m["count"] == 10 and len(m["parts"]) == 3
    assert [k for k in store.list("ts") if "part-" in k] == [p["key"] for p in m["parts"]]


def test_a_corrupt_image_names_its_id_and_shard(store):
    rng = np.random.default_rng(0)
    good = encode_png(bar_image(rng, 0))
    shards = write_shards(store, "drops/bad", [("ok", good, None), ("broken", good[:40], None)])
    rows = pa.table({"image_id": ["ok", "broken"], "shard": [shards[0].key] * 2, "cls": [0, 1]})
    with pytest.raises(ValueError, match=r"Image 'broken' in shard 'drops/bad/part-00000.parquet' cannot be decoded"):
        write_training_shards(store, "ts", rows, 1, SIZE, seed=0)
    assert not store.exists("ts/manifest.json")


@pytest.mark.parametrize("rows,message", [
    (pa.table({"image_id": ["a"], "cls": [0]}), "lack column"),
    (pa.table({"image_id": ["nope"], "shard": ["drops/d1/shards/part-00000.parquet"], "cls": [0]}),
     "Image 'nope' is not in shard"),
    (pa.table({"image_id": [None], "shard": ["x"], "cls": [0]}, schema=pa.schema(
        [("image_id", pa.string()), ("shard", pa.string()), ("cls", pa.int64())])), "null values"),
])
def test_bad_rows_fail_with_one_sentence(store, rows, message):
    make_source(store, n=3)
    with pytest.raises(ValueError, match=message):
        write_training_shards(store, "ts", rows, 1, SIZE, seed=0)


def epoch_batches(stream: ShardStream, batch_size: int, seed: int, epochs: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return [list(stream.batches(batch_size, gen)) for _ in range(epochs)]


def test_stream_yields_every_row_once_per_epoch_in_full_batches(store):
    _, where = make_source(store)
    rows = selection(where, extra={"img-004": 2})
    write_training_shards(store, "ts", rows, 1, SIZE, seed=0, part_rows=7)
    stream = ShardStream(store, "ts")
    assert len(stream) == 31
    expected = {i: decode(b, 1, SIZE) for i, (_, b, _) in where.items()}
    pixel_ids = {v.tobytes(): i for i, v in expected.items()}
    epochs = epoch_batches(stream, 8, seed=5)
    for batches in epochs:
        assert [len(y) for _, y in batches] == [8, 8, 8, 7]  # leftovers carried across the 7-row parts
        x = torch.cat([b[0] for b in batches]).numpy()
        y = torch.cat([b[1] for b in batches]).tolist()
        assert x.dtype == np.uint8 and x.shape == (31, 1, 8, 8) and batches[0][1].dtype == torch.int64
        got = sorted((pixel_ids[img.tobytes()], label) for img, label in zip(x, y, strict=True))
        assert got == sorted(zip(rows.column("image_id").to_pylist(), rows.column("cls").to_pylist(), strict=True))
    orders = [torch.cat([b[1] for b in batches]).tolist() + [int(b[0].sum()) for b in batches] for batches in epochs]
    assert orders[0] != orders[1]  # each epoch is reshuffled
    again = epoch_batches(stream, 8, seed=5)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for e1, e2 in zip(epochs, again, strict=True) for a, b in zip(e1, e2, strict=True))


def test_stream_stops_cleanly_when_abandoned(store):
    _, where = make_source(store)
    write_training_shards(store, "ts", selection(where), 1, SIZE, seed=0, part_rows=4)
    it = ShardStream(store, "ts").batches(3, torch.Generator().manual_seed(0))
    next(it)
    it.close()  # the prefetch thread is joined, no exception


def test_training_from_a_stream_learns(store):
    _, where = make_source(store, n=60)
    rows = selection(where)
    write_training_shards(store, "ts", rows, 1, (12, 12), seed=0, part_rows=16)
    stream = ShardStream(store, "ts")
    recipe = Recipe(epochs=8, lr=0.05, batch_size=16, augment="none", seed=3)
    torch.manual_seed(0)
    model = build_model("cnn_small", 1, 3, (12, 12))
    summary = train_stream(model, stream, recipe, name="student")
    assert summary["steps"] == 8 * 4 and summary["images"] == 60
    x = np.stack([decode(where[i][1], 1, (12, 12)) for i in sorted(where)])
    y = np.array([where[i][2] for i in sorted(where)])
    assert (predict(model, x).argmax(1).numpy() == y).mean() > 0.9
    torch.manual_seed(0)
    again = build_model("cnn_small", 1, 3, (12, 12))
    assert train_stream(again, stream, recipe)["final_loss"] == summary["final_loss"]  # reproducible
    with pytest.raises(ValueError, match="balanced sampling needs in-memory images"):
        train_stream(model, stream, Recipe(epochs=1, lr=0.1, balanced_sampling=True))


def test_in_memory_training_still_gives_the_same_weights():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 40)
    x = np.stack([bar_image(rng, c)[None] for c in y])
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("cnn_small", 1, 3, (12, 12))
        train(model, x, y, Recipe(epochs=2, lr=0.05, batch_size=16, seed=1))
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_training_shards_on_s3(s3_server):
    import boto3

    boto3.client("s3").create_bucket(Bucket="semisup-ts")
    s3 = Store.from_uri("s3://semisup-ts/store")
    _, where = make_source(s3, n=20)
    rows = selection(where, extra={"img-001": 0})
    m = write_training_shards(s3, "runs/r/trainshards", rows, 1, SIZE, seed=2, part_rows=6, bucket_rows=4,
                              spill_bytes=1)
    assert s3.exists("runs/r/trainshards/manifest.json") and s3.list("runs/r/trainshards/_spill") == []
    assert write_training_shards(s3, "runs/r/trainshards", rows, 1, SIZE, seed=2, part_rows=6) == m
    batches = list(ShardStream(s3, "runs/r/trainshards").batches(8, torch.Generator().manual_seed(0)))
    assert [len(y) for _, y in batches] == [8, 8, 5]
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(rows.column("cls").to_pylist())
