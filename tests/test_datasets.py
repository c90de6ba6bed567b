"""Dataset and drop import: ImageFolder trees, splits, versions, manifests, drops, truth, S3."""

from __future__ import annotations

import io
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from semisup_tasks import datasets
from semisup_tasks.config import ConfigError
from semisup_tasks.images import SCHEMA
from semisup_tasks.store import SUCCESS, Store, StoreError


def _image_bytes(value: int, size: tuple[int, int] = (8, 8), mode: str = "RGB", fmt: str = "PNG") -> bytes:
    color = value if mode == "L" else (value, 255 - value, value // 2)
    buf = io.BytesIO()
    Image.new(mode, (size[1], size[0]), color).save(buf, format=fmt)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _tree(root: Path, counts: dict[str, int], mode: str = "RGB", size: tuple[int, int] = (8, 8)) -> Path:
    for cls, n in counts.items():
        for i in range(n):
            _write(root / cls / f"{i:03d}.png", _image_bytes(10 * i, size, mode))
    return root


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.from_uri(f"file://{tmp_path}/store")


def test_stratified_import_splits_per_class_and_skips_corrupt(store: Store, tmp_path: Path) -> None:
    root = _tree(tmp_path / "tree", {"dog": 10, "cat": 20, "bird": 10})
    _write(root / "cat" / "odd-size.jpg", _image_bytes(7, (12, 12), fmt="JPEG"))  # resized at read time
    _write(root / "dog" / "broken.png", b"\x89PNG not really an image")
    _write(root / "dog" / "notes.txt", b"not an image, ignored")
    _write(root / "dog" / ".hidden.png", b"editor debris, ignored")

    m = datasets.import_imagefolder(store, "pets", str(root), seed=3)

    assert m["version"] == "v1" and m["kind"] == "dataset"
    assert m["classes"] == ["bird", "cat", "dog"]  # sorted by folder name
    assert m["channels"] == 3 and m["image_size"] == [8, 8]  # the most common size wins
    assert m["skipped"] == 1 and m["skipped_reasons"] == {"not an image": 1}
    assert m["empty_classes"] == []
    s = m["splits"]
    assert s["test"]["class_counts"] == [2, 4, 2]  # round(0.2 * n) per class
    assert s["val"]["class_counts"] == [1, 2, 1]  # round(0.1 * n) per class
    assert s["train"]["class_counts"] == [7, 15, 7]
    assert sum(s[x]["count"] for x in datasets.SPLITS) == 41
    assert store.exists(f"datasets/pets/v1/{SUCCESS}")
    assert all(sh["key"].startswith("datasets/pets/v1/shards/train-") for sh in s["train"]["shards"])

    x, y, ids = datasets.load_split(store, m, "train")
    assert x.shape == (29, 3, 8, 8) and x.dtype == np.uint8 and y.dtype == np.int64
    assert [m["classes"][label] for label in y] == [i.split("/")[0] for i in ids]
    all_ids = [i for split in datasets.SPLITS for i in datasets.load_split(store, m, split)[2]]
    assert len(all_ids) == len(set(all_ids)) == 41
    assert "cat/odd-size.jpg" in all_ids

    # the same seed draws the same split
    again = datasets.import_imagefolder(store, "pets", str(root), seed=3)
    assert again["version"] == "v2"
    assert datasets.load_split(store, again, "test")[2] == datasets.load_split(store, m, "test")[2]


def test_split_folders_give_the_splits_and_grayscale_stays_one_channel(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    _tree(root / "train", {"a": 5, "b": 3}, mode="L")
    _tree(root / "val", {"a": 2, "b": 1}, mode="L")
    _tree(root / "test", {"a": 1, "b": 4}, mode="L")

    m = datasets.import_imagefolder(store, "letters", f"file://{root}", val_fraction=0.5)

    assert m["channels"] == 1 and m["image_size"] == [8, 8]
    assert m["split"] == {"method": "folders"}
    assert [m["splits"][s]["class_counts"] for s in datasets.SPLITS] == [[5, 3], [2, 1], [1, 4]]
    x, y, ids = datasets.load_split(store, m, "test")
    assert x.shape == (5, 1, 8, 8)
    assert y.tolist() == [0, 1, 1, 1, 1] and ids[0] == "test/a/000.png"


def test_versions_latest_and_no_overwrite(store: Store, tmp_path: Path) -> None:
    root = _tree(tmp_path / "tree", {"a": 3, "b": 3})
    missing = r"'nums' \(version latest\) is not in the store.*import-imagefolder"
    with pytest.raises(ConfigError, match=missing):
        datasets.load_dataset_manifest(store, "nums")

    datasets.import_imagefolder(store, "nums", str(root))
    datasets.import_imagefolder(store, "nums", str(root), version="v9")
    # a crashed import leaves shards without a manifest: invisible, and cleared when its version is written
    store.write_bytes("datasets/nums/v11/shards/train-00042.parquet", b"debris")
    assert datasets.import_imagefolder(store, "nums", str(root))["version"] == "v10"
    assert datasets.dataset_versions(store, "nums") == ["v1", "v9", "v10"]
    assert datasets.load_dataset_manifest(store, "nums")["version"] == "v10"  # numeric, not "v9" > "v10"
    assert datasets.load_dataset_manifest(store, "nums", "v1")["version"] == "v1"

    datasets.import_imagefolder(store, "nums", str(root), version="v11")
    assert not store.exists("datasets/nums/v11/shards/train-00042.parquet")

    with pytest.raises(ConfigError, match="version v1 already exists"):
        datasets.import_imagefolder(store, "nums", str(root), version="v1")
    with pytest.raises(ConfigError, match=r"version v5\) is not in the store .* \(it has v1, v9, v10, v11\)"):
        datasets.load_dataset_manifest(store, "nums", "v5")
    with pytest.raises(ConfigError, match="has no split 'holdout'"):
        datasets.load_split(store, datasets.load_dataset_manifest(store, "nums"), "holdout")


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, "has no .png/.jpg/.jpeg/.webp/.gif/.bmp images"),
        ({"loose.png": b"img"}, "has no class subfolders"),
        ({"a/x.png": b"img", "b/broken.png": b"garbage"},
         r"usable training images in 1 class folder\(s\) \(a; 1 images skipped: 1 not an image\)"),
        ({"a/x.png": b"img", "a/y.png": b"img"}, r"has a single class folder \(a/\); a classifier needs"),
        ({"train/a/x.png": b"img", "val/b/y.png": b"img"}, r"Class 'b' has no folder .*/train/b"),
        ({"train/a/x.png": b"img", "cats/y.png": b"img"}, "mixes split folders"),
        ({"val/a/x.png": b"img", "test/a/y.png": b"img"}, "no train/ folder"),
        ({"train/a/x.png": b"img", "test/b/y.png": b"img"}, "Class 'b' has no folder .*/train/b"),
        ({"train/x.png": b"img"}, r"/train has no class subfolders"),
    ],
)
def test_malformed_trees_are_refused_with_one_sentence(
    store: Store, tmp_path: Path, layout: dict[str, bytes], message: str
) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    for rel, data in layout.items():
        _write(root / rel, _image_bytes(1) if data == b"img" else data)
    with pytest.raises(ConfigError, match=message):
        datasets.import_imagefolder(store, "bad", str(root))
    assert store.list("datasets") == []  # a refused import writes nothing


def test_bad_arguments(store: Store, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        datasets.import_imagefolder(store, "x", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="dataset name"):
        datasets.import_imagefolder(store, "../escape", str(tmp_path))
    with pytest.raises(ConfigError, match="sum to less than 1"):
        datasets.import_imagefolder(store, "x", str(tmp_path), val_fraction=0.5, test_fraction=0.5)


def test_import_drop_is_unlabeled_idempotent_and_counts_skips(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "wild"
    for i in range(5):
        _write(src / ("deep/er" if i % 2 else "") / f"img{i}.PNG", _image_bytes(i, (6 + i, 9)))
    _write(src / "cam" / "shot.jpeg", _image_bytes(50, fmt="JPEG"))
    _write(src / "cam" / "truncated.jpg", _image_bytes(60, fmt="JPEG")[:40])
    _write(src / "README.md", b"ignored")

    m = datasets.import_drop(store, "week-01", str(src), shard_size=2)

    assert (m["kind"], m["drop_id"], m["count"], m["skipped"]) == ("drop", "week-01", 6, 1)
    assert m["skipped_reasons"] == {"truncated": 1}
    assert [s["count"] for s in m["shards"]] == [2, 2, 2]
    assert m["shards"][0]["key"] == "drops/week-01/shards/part-00000.parquet"
    table = pa.concat_tables([store.read_table(s["key"]) for s in m["shards"]])
    assert table.schema.equals(SCHEMA)
    assert table.column("label").null_count == 6
    assert table.column("image_id").to_pylist() == sorted(
        ["week-01/cam/shot.jpeg", "week-01/img0.PNG", "week-01/img2.PNG", "week-01/img4.PNG",
         "week-01/deep/er/img1.PNG", "week-01/deep/er/img3.PNG"]
    )
    assert datasets.list_drops(store) == ["week-01"]
    other = datasets.write_drop(store, "written", [("a.png", _image_bytes(1))], source="test", skipped=2)
    assert other["skipped_reasons"] == {"unspecified": 2}
    with pytest.raises(ValueError, match="do not add up"):
        datasets.write_drop(store, "wrong", [("a.png", _image_bytes(1))], source="test", skipped=2,
                            skipped_reasons={"truncated": 1})
    assert store.list("drops/wrong") == []  # refused before any shard was written
    store.delete_prefix("drops/written")
    assert datasets.load_drop_manifest(store, "week-01") == m

    # importing the same drop id again does nothing, even when the source is gone
    before = {k: store.read_bytes(k) for k in store.list("drops")}
    assert datasets.import_drop(store, "week-01", str(tmp_path / "gone")) == m
    assert {k: store.read_bytes(k) for k in store.list("drops")} == before


def test_drop_errors(store: Store, tmp_path: Path) -> None:
    _write(tmp_path / "junk" / "a.png", b"not an image")
    with pytest.raises(ConfigError, match=r"None of the 1 images .* is usable \(1 not an image\)"):
        datasets.import_drop(store, "junk", str(tmp_path / "junk"))
    assert datasets.list_drops(store) == []
    with pytest.raises(ConfigError, match="drop id"):
        datasets.import_drop(store, "bad/id", str(tmp_path))
    with pytest.raises(ConfigError, match=r"Drop 'nope' is not in the store .*semisup import-drop"):
        datasets.load_drop_manifest(store, "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no .png/.jpg/.jpeg/.webp/.gif/.bmp images"):
        datasets.import_drop(store, "empty", str(tmp_path / "empty"))


def test_load_truth_concatenates_the_drops_that_have_one(store: Store) -> None:
    assert datasets.load_truth(store, ["d1", "d2"]) is None
    datasets.write_truth(store, "d2", ["d2/a.png", "d2/b.png"], [3, datasets.DISTRACTOR])
    datasets.write_truth(store, "d3", ["d3/c.png"], [1])
    truth = datasets.load_truth(store, ["d1", "d2", "d3"])
    assert truth.schema.equals(datasets.TRUTH_SCHEMA)
    assert truth.to_pydict() == {"image_id": ["d2/a.png", "d2/b.png", "d3/c.png"], "label": [3, -1, 1]}


def test_import_over_s3(s3_server: str) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="src-images")
    s3.create_bucket(Bucket="semisup-store")
    for cls, n in {"ant": 4, "bee": 6}.items():
        for i in range(n):
            body = _image_bytes(20 * i, (5, 7), "L")
            s3.put_object(Bucket="src-images", Key=f"tree/{cls}/{i}.png", Body=body)
    s3.put_object(Bucket="src-images", Key="tree/bee/corrupt.png", Body=b"nope")
    for i in range(3):
        s3.put_object(Bucket="src-images", Key=f"wild/batch/{i}.png", Body=_image_bytes(i))
    store = Store.from_uri("s3://semisup-store/root")

    m = datasets.import_imagefolder(store, "insects", "s3://src-images/tree", val_fraction=0.2,
                                    test_fraction=0.2)
    assert m["source"] == "s3://src-images/tree" and m["skipped"] == 1
    assert (m["channels"], m["image_size"]) == (1, [5, 7])
    assert [m["splits"][s]["class_counts"] for s in datasets.SPLITS] == [[2, 4], [1, 1], [1, 1]]
    x, y, ids = datasets.load_split(store, datasets.load_dataset_manifest(store, "insects"), "train")
    assert x.shape == (6, 1, 5, 7) and sorted(y.tolist()) == [0, 0, 1, 1, 1, 1]

    d = datasets.import_drop(store, "s3-drop", "s3://src-images/wild/")
    assert d["count"] == 3 and datasets.list_drops(store) == ["s3-drop"]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="semisup-store")["Contents"]]
    assert "root/drops/s3-drop/_SUCCESS.json" in keys and "root/datasets/insects/v1/_SUCCESS.json" in keys

    with pytest.raises(StoreError, match="reach bucket 'no-such-bucket'"):
        datasets.import_drop(store, "other", "s3://no-such-bucket/x")


def test_import_drop_reads_webdataset_tars_and_img2dataset_parquet(tmp_path):
    """Drops may come as loose images, WebDataset-style tar shards, or img2dataset Parquet shards."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from semisup_tasks.datasets import import_drop
    from semisup_tasks.images import encode_png
    from semisup_tasks.store import Store

    src = tmp_path / "src"
    (src / "loose").mkdir(parents=True)
    rng = np.random.default_rng(0)

    def png() -> bytes:
        return encode_png(rng.integers(0, 255, (8, 8), dtype=np.uint8))

    (src / "loose" / "a.png").write_bytes(png())
    with tarfile.open(src / "00000.tar", "w") as tar:  # img2dataset's webdataset layout
        for name, data in [("000000000.jpg", png()), ("000000000.txt", b"a caption"),
                           ("000000001.jpg", png()), ("000000002.jpg", b"truncated")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"key": ["k0", "k1", "k2"], "jpg": [png(), None, png()],
                             "caption": ["x", "y", "z"]}), src / "00001.parquet")  # img2dataset's parquet

    store = Store.from_uri(f"file://{tmp_path}/store")
    manifest = import_drop(store, "mixed", str(src))
    assert manifest["count"] == 5 and manifest["skipped"] == 2  # the truncated jpg and the failed row
    assert manifest["skipped_reasons"] == {"no image bytes": 1, "not an image": 1}  # b"truncated" has no header
    ids = store.read_table(manifest["shards"][0]["key"]).column("image_id").to_pylist()
    assert ids == ["mixed/loose/a.png", "mixed/00000.tar/000000000.jpg", "mixed/00000.tar/000000001.jpg",
                   "mixed/00001.parquet/k0", "mixed/00001.parquet/k2"]


def test_nested_folders_and_junk_in_an_imagefolder(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    _tree(root, {"a": 3, "b": 3})
    _write(root / "a" / "deep" / "er" / "nested.png", _image_bytes(9))  # nested folders belong to their class
    _write(root / "b" / "notes.txt", b"ignored")
    _write(root / "loose.png", _image_bytes(3))  # not in a class folder: ignored with a warning
    _write(root / "__MACOSX" / "a" / "._000.png", b"resource fork")  # zip debris
    _write(root / ".git" / "objects" / "x.png", b"hidden")
    (root / "c").mkdir()  # an empty class folder is a class all the same, with 0 images

    m = datasets.import_imagefolder(store, "junk", str(root), val_fraction=0, test_fraction=0)

    assert m["classes"] == ["a", "b", "c"] and m["empty_classes"] == ["c"]
    assert m["splits"]["train"]["class_counts"] == [4, 3, 0]
    assert m["skipped"] == 0 and m["skipped_reasons"] == {}
    assert "a/deep/er/nested.png" in datasets.load_split(store, m, "train")[2]
