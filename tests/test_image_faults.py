"""Corrupt and odd images in drops and datasets: every bad one is skipped and counted under its
reason, every good one is kept and decodes to sensible pixels, and nothing crashes.

Every file is built here with Pillow (or byte by byte where Pillow would refuse to write it)."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import tarfile
import textwrap
import warnings
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from semisup_tasks import datasets
from semisup_tasks.config import ConfigError
from semisup_tasks.images import MAX_PIXELS, BadImage, decode, probe
from semisup_tasks.store import SUCCESS, Store

# the bombs in the warning range make Pillow warn before decode() refuses them; that is expected here
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RED, GREEN = (255, 0, 0), (0, 255, 0)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(h: int = 48, w: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


# -- bytes Pillow would not write: bombs from their header ---------------------------------------
def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_of_black(width: int, height: int) -> bytes:
    """A real, valid RGB PNG of black: tiny on disk (zeros compress ~1000x), huge once decoded."""
    comp, row, block = zlib.compressobj(9), b"\x00" * (1 + 3 * width), 256
    idat = b"".join(comp.compress(row * min(block, height - y)) for y in range(0, height, block)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height over a 1x1 image's data: only the header is ever read."""
    small = _save(Image.new("RGB", (1, 1)), "PNG")
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + small[8 + 25:]


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) is patched to claim width x height."""
    data = bytearray(_save(Image.new("RGB", (8, 8)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


# -- odd but good images, each with a check of its decoded pixels --------------------------------
def _rgba() -> bytes:
    img = Image.new("RGBA", (20, 10), (255, 255, 255, 0))  # right half: transparent white
    img.paste((255, 0, 0, 255), (0, 0, 10, 10))  # left half: opaque red
    return _save(img, "PNG")


def _la() -> bytes:
    img = Image.new("LA", (20, 10), (255, 0))
    img.paste((200, 255), (0, 0, 10, 10))
    return _save(img, "PNG")


def _palette_with_transparency() -> bytes:
    img = Image.new("P", (20, 10), 0)
    img.putpalette([255, 255, 255, 0, 255, 0] + [0] * 762)  # index 0 white (transparent), 1 green
    img.paste(1, (0, 0, 10, 10))
    return _save(img, "PNG", transparency=0)


def _cmyk() -> bytes:
    return _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)  # red, in ink


def _gray16() -> bytes:
    arr = np.full((10, 20), 0x1000, dtype=np.uint16)  # 4096 of 65535: dark grey
    arr[:, 10:] = 0xC000  # 49152: light grey; a clipping conversion makes both white
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    return _save(img, "PNG")


def _upright() -> np.ndarray:
    """32 high, 16 wide, a white block in the top-left corner: wrong in any rotation or mirror."""
    arr = np.zeros((32, 16, 3), dtype=np.uint8)
    arr[:10, :6] = 255
    return arr


def _exif_rotated(orientation: int) -> bytes:
    # the EXIF rule: orientation 6 is shown rotated 90 degrees clockwise, 8 counter-clockwise, so
    # the stored pixels are the upright ones turned the other way (np.rot90 turns counter-clockwise)
    stored = np.rot90(_upright(), 1 if orientation == 6 else -1)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(Image.fromarray(np.ascontiguousarray(stored)), "JPEG", quality=95, exif=exif.tobytes())


def _halves(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean colour (per channel) of the left and right halves of a CxHxW array."""
    w = arr.shape[2]
    return arr[:, :, : w // 2].mean(axis=(1, 2)), arr[:, :, w // 2:].mean(axis=(1, 2))


def _check_upright(rgb: np.ndarray, gray: np.ndarray) -> None:
    assert rgb.shape == (3, 32, 16) and gray.shape == (1, 32, 16)
    assert (rgb[:, 1:9, 1:5] > 200).all()  # the block is at the top left...
    assert (rgb[:, 14:, :] < 40).all() and (rgb[:, :, 8:] < 40).all()  # ...and nowhere else


GOOD: dict[str, tuple[Callable[[], bytes], tuple[int, int, int], Callable[[np.ndarray, np.ndarray], None]]] = {
    # name: (bytes, probe's (channels, height, width), check of decode's (RGB, grayscale) arrays)
    "plain.png": (lambda: _save(_noise(), "PNG"), (3, 48, 64),
                  lambda rgb, gray: np.testing.assert_array_equal(rgb.transpose(1, 2, 0), np.asarray(_noise()))),
    "plain.jpg": (lambda: _save(_noise(), "JPEG"), (3, 48, 64), lambda rgb, gray: None),
    "gray.png": (lambda: _save(Image.fromarray(np.tile(np.arange(0, 200, 10, dtype=np.uint8), (10, 1))), "PNG"),
                 (1, 10, 20), lambda rgb, gray: np.testing.assert_array_equal(gray[0, 0], np.arange(0, 200, 10))),
    "rgba.png": (_rgba, (3, 10, 20),
                 lambda rgb, gray: [np.testing.assert_array_equal(h, e) for h, e in zip(_halves(rgb), (RED, (0, 0, 0)),
                                                                                       strict=True)]),
    "la.png": (_la, (1, 10, 20),
               lambda rgb, gray: [np.testing.assert_array_equal(h, e) for h, e in zip(_halves(gray), ([200], [0]),
                                                                                     strict=True)]),
    "palette-transparent.png": (_palette_with_transparency, (3, 10, 20),
                                lambda rgb, gray: [np.testing.assert_array_equal(h, e) for h, e in
                                                   zip(_halves(rgb), (GREEN, (0, 0, 0)), strict=True)]),
    "cmyk.jpg": (_cmyk, (3, 16, 16),
                 lambda rgb, gray: np.testing.assert_allclose(rgb.mean(axis=(1, 2)), RED, atol=25)),
    "gray16.png": (_gray16, (1, 10, 20),
                   lambda rgb, gray: [np.testing.assert_array_equal(h, e) for h, e in zip(_halves(gray), ([16], [192]),
                                                                                         strict=True)]),
    "exif-6.jpg": (lambda: _exif_rotated(6), (3, 32, 16), _check_upright),
    "exif-8.jpg": (lambda: _exif_rotated(8), (3, 32, 16), _check_upright),
}

BAD: dict[str, tuple[Callable[[], bytes], str]] = {
    "cut-half.jpg": (lambda: (d := _save(_noise(), "JPEG"))[: len(d) // 2], "truncated"),
    "cut-half.png": (lambda: (d := _save(_noise(), "PNG"))[: len(d) // 2], "truncated"),
    "cut-in-header.png": (lambda: _save(_noise(), "PNG")[:40], "truncated"),
    "zero-bytes.png": (lambda: b"", "empty file"),
    "random.jpg": (lambda: np.random.default_rng(1).bytes(2000), "not an image"),
    "text.png": (lambda: b"this is a text file, not a picture\n" * 20, "not an image"),
    "postscript.png": (lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "not an image"),
    "bomb-1.5x.png": (lambda: _png_of_black(6400, 6400), "too many pixels"),  # Pillow only warns here
    "bomb-10x.png": (lambda: _png_header_only(20_000, 20_000), "too many pixels"),  # Pillow refuses this one
    "bomb-1.2x.jpg": (lambda: _jpeg_claiming(7000, 7000), "too many pixels"),
}


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return {name: make() for name, (make, *_) in {**GOOD, **BAD}.items()}


def test_the_bombs_are_in_the_ranges_they_claim(files: dict[str, bytes]) -> None:
    sizes = {}
    for name in ("bomb-1.5x.png", "bomb-10x.png", "bomb-1.2x.jpg"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                with Image.open(io.BytesIO(files[name])) as img:
                    sizes[name] = img.width * img.height
            except Image.DecompressionBombError:
                sizes[name] = None  # over twice the limit: Pillow refuses to even open it
    assert MAX_PIXELS < sizes["bomb-1.5x.png"] <= 2 * MAX_PIXELS
    assert MAX_PIXELS < sizes["bomb-1.2x.jpg"] <= 2 * MAX_PIXELS
    assert sizes["bomb-10x.png"] is None
    assert len(files["bomb-1.5x.png"]) < 500_000  # cheap to make and store, 123 MB once decoded


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_images_are_refused_with_their_reason(files: dict[str, bytes], name: str) -> None:
    reason = BAD[name][1]
    for call in (lambda d: probe(d), lambda d: decode(d, 3, (8, 8)), lambda d: decode(d, 1, (8, 8))):
        with pytest.raises(BadImage) as info:
            call(files[name])
        assert info.value.reason == reason
        assert str(info.value).startswith(reason)


def test_a_bomb_is_refused_the_same_way_when_warnings_are_errors(files: dict[str, bytes]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("bomb-1.5x.png", "bomb-1.2x.jpg"):
            with pytest.raises(BadImage, match="too many pixels"):
                probe(files[name])


def test_a_bomb_is_refused_from_its_header_without_decoding(files: dict[str, bytes], tmp_path: Path) -> None:
    """Peak memory of a fresh process stays flat: decoding the 6400x6400 RGB bomb would take ~160 MB."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(files["bomb-1.5x.png"])
    script = textwrap.dedent(f"""
        import json, resource, warnings
        from semisup_tasks.images import BadImage, decode, probe
        warnings.simplefilter("ignore")
        data = open({str(bomb)!r}, "rb").read()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        reasons = []
        for call in (lambda: probe(data), lambda: decode(data, 3, (32, 32))):
            try:
                call()
            except BadImage as exc:
                reasons.append(exc.reason)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps({{"reasons": reasons, "grown_kb": grown}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1], check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["reasons"] == ["too many pixels", "too many pixels"]
    assert result["grown_kb"] < 30_000, result


@pytest.mark.parametrize("name", sorted(GOOD))
def test_odd_images_decode_upright_and_sensible(files: dict[str, bytes], name: str) -> None:
    _, shape, check = GOOD[name]
    assert probe(files[name]) == shape
    _, h, w = shape
    rgb, gray = decode(files[name], 3, (h, w)), decode(files[name], 1, (h, w))
    assert rgb.dtype == gray.dtype == np.uint8
    check(rgb, gray)
    assert decode(files[name], 3, (8, 12)).shape == (3, 8, 12)  # and resize to any dataset size


def _as_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("packing", ["loose", "tar"])
def test_a_drop_keeps_every_good_image_and_counts_each_bad_one(
    files: dict[str, bytes], tmp_path: Path, packing: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    if packing == "loose":
        for name, data in files.items():
            (src / name).write_bytes(data)
        prefix = "odd"
    else:
        _as_tar(src / "00000.tar", files)
        prefix = "odd/00000.tar"
    store = Store.from_uri(f"file://{tmp_path}/store")

    m = datasets.import_drop(store, "odd", str(src), shard_size=4)

    assert m["count"] == len(GOOD) and m["skipped"] == len(BAD)
    assert m["skipped_reasons"] == dict(Counter(reason for _, reason in BAD.values()))
    assert m["skipped_reasons"] == {"empty file": 1, "not an image": 3, "too many pixels": 3, "truncated": 3}
    table = pa.concat_tables([store.read_table(s["key"]) for s in m["shards"]])
    ids = table.column("image_id").to_pylist()
    assert sorted(ids) == sorted(f"{prefix}/{name}" for name in GOOD)
    # the shards hold the original bytes; decoding them gives the same sensible pixels
    for image_id, data in zip(ids, table.column("image").to_pylist(), strict=True):
        _, (_, h, w), check = GOOD[image_id.rsplit("/", 1)[1]]
        check(decode(data, 3, (h, w)), decode(data, 1, (h, w)))
    assert datasets.load_drop_manifest(store, "odd") == m


def test_a_drop_without_usable_images_ends_in_one_sentence_and_leaves_nothing(
    files: dict[str, bytes], tmp_path: Path
) -> None:
    src = tmp_path / "bad"
    src.mkdir()
    for name, data in files.items():
        if name in BAD:
            (src / name).write_bytes(data)
    store = Store.from_uri(f"file://{tmp_path}/store")
    # debris of an earlier import that crashed before its manifest: cleared, not kept or committed
    store.write_bytes("drops/week-9/shards/part-00000.parquet", b"half a shard")

    with pytest.raises(ConfigError) as info:
        datasets.import_drop(store, "week-9", str(src))
    message = str(info.value)
    assert message.startswith(f"None of the {len(BAD)} images under {src} is usable (")
    assert "3 too many pixels" in message and "1 empty file" in message and "import drop 'week-9' again" in message
    assert message.count(". ") == 0 and message.endswith(".")
    assert store.list("drops") == [] and datasets.list_drops(store) == []
    assert not store.exists(f"drops/week-9/{SUCCESS}")

    # the fixed source imports under the same id: nothing left behind trips it
    (src / "plain.png").write_bytes(files["plain.png"])
    m = datasets.import_drop(store, "week-9", str(src))
    assert m["count"] == 1 and m["skipped"] == len(BAD)


def test_tar_shards_without_images_end_in_one_sentence(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _as_tar(src / "00000.tar", {"000.txt": b"a caption only"})
    store = Store.from_uri(f"file://{tmp_path}/store")
    with pytest.raises(ConfigError, match=r"The 1 shard file\(s\) under .* hold no \.png/\.jpg/.* images"):
        datasets.import_drop(store, "captions", str(src))
    assert store.list("drops") == []


def test_an_imagefolder_with_odd_images_keeps_them_and_counts_the_bad(files: dict[str, bytes], tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for cls, names in {"a": ["gray.png", "la.png", "gray16.png", "zero-bytes.png"],
                       "b": ["rgba.png", "exif-6.jpg", "exif-8.jpg", "cut-half.jpg", "bomb-1.5x.png"]}.items():
        (root / cls).mkdir(parents=True)
        for name in names:
            (root / cls / name).write_bytes(files[name])
    store = Store.from_uri(f"file://{tmp_path}/store")

    m = datasets.import_imagefolder(store, "odd", str(root), val_fraction=0, test_fraction=0)

    assert m["skipped"] == 3
    assert m["skipped_reasons"] == {"empty file": 1, "too many pixels": 1, "truncated": 1}
    assert m["splits"]["train"]["class_counts"] == [3, 3]
    assert m["channels"] == 3  # mixed grayscale and colour: colour wins
    x, y, ids = datasets.load_split(store, m, "train")
    assert x.shape == (6, 3, *m["image_size"]) and sorted(ids) == sorted(
        ["a/gray.png", "a/la.png", "a/gray16.png", "b/rgba.png", "b/exif-6.jpg", "b/exif-8.jpg"])


def _bar(rng: np.random.Generator, position: int) -> bytes:
    """12x12 grayscale noise with a bright vertical bar at one of three positions."""
    img = rng.integers(0, 60, (12, 12), dtype=np.uint8)
    img[:, 1 + position * 4:3 + position * 4] = 255
    return _save(Image.fromarray(img), "PNG")


@pytest.mark.slow
def test_classes_without_usable_images_are_kept_and_a_whole_run_handles_them(
    files: dict[str, bytes], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """'broken' holds only unusable images and 'empty' nothing: both stay classes (index = folder order)
    with 0 images, and every stage, the metrics and the report cope with a class no model can learn."""
    from semisup_tasks.stages import run_pipeline

    rng = np.random.default_rng(0)
    root = tmp_path / "tree"
    for position, cls in enumerate(["left", "middle", "right"]):
        (root / cls).mkdir(parents=True)
        for i in range(14):
            (root / cls / f"{i:02d}.png").write_bytes(_bar(rng, position))
    (root / "broken").mkdir()
    (root / "broken" / "cut.jpg").write_bytes(files["cut-half.jpg"])
    (root / "broken" / "empty.png").write_bytes(b"")
    (root / "empty").mkdir()
    wild = tmp_path / "wild"
    wild.mkdir()
    for i in range(30):
        (wild / f"{i:03d}.png").write_bytes(_bar(rng, i % 3))
    (wild / "zero.png").write_bytes(b"")
    store = Store.from_uri(f"file://{tmp_path}/store")

    m = datasets.import_imagefolder(store, "bars", str(root))
    assert m["classes"] == ["broken", "empty", "left", "middle", "right"]
    assert m["empty_classes"] == ["broken", "empty"]
    assert m["splits"]["train"]["class_counts"][:2] == [0, 0] and min(m["splits"]["train"]["class_counts"][2:]) > 0
    assert m["skipped_reasons"] == {"empty file": 1, "truncated": 1}
    assert "Class 'empty' has no usable training image" in caplog.text
    datasets.import_drop(store, "wild-1", str(wild))

    params = {"dataset": "bars", "teacher_arch": "cnn_small", "teacher_epochs": 3, "pretrain_epochs": 2,
              "finetune_epochs": 2, "k": 4, "p": 2, "batch_size": 16, "augment": "none", "shards_per_task": 1}
    result = run_pipeline(store, "r1", params)

    metrics = store.read_json("runs/r1/evaluate/metrics.json")
    assert set(result["summary"]) >= {"teacher", "baseline", "student"}
    assert metrics["dataset"]["train_class_counts"][:2] == [0, 0]
    for model in metrics["models"].values():
        assert model["per_class_recall"][:2] == [None, None]  # no test image: no recall, not NaN
        assert model["top1"] is not None
    # the teacher never saw 'broken' or 'empty': none of its picks for them reaches the student
    picked = store.read_table("runs/r1/select/selection.parquet").column("cls").to_pylist()
    assert picked and not {0, 1} & set(picked)
    assert metrics["selection"]["untaught_classes"] == [0, 1] and metrics["selection"]["shortfall"][:2] == [4, 4]
    md = store.read_bytes("runs/r1/evaluate/report.md").decode()
    assert "| broken |" in md and "| empty |" in md



def test_a_file_name_with_a_control_character_is_skipped_and_the_rest_imported(tmp_path: Path) -> None:
    wild = tmp_path / "wild"
    wild.mkdir()
    rng = np.random.default_rng(0)
    (wild / "kept.png").write_bytes(_bar(rng, 0))
    (wild / "bad\nname.png").write_bytes(_bar(rng, 1))
    store = Store.from_uri(f"file://{tmp_path}/store")
    m = datasets.import_drop(store, "d1", str(wild))
    assert m["count"] == 1 and m["skipped"] == 1
    ids = store.read_table(m["shards"][0]["key"], columns=["image_id"]).column("image_id").to_pylist()
    assert [i.rsplit("/", 1)[-1] for i in ids] == ["kept.png"]


def test_webp_gif_and_bmp_files_are_imported_like_png(tmp_path: Path) -> None:
    """Pillow reads them (images.FORMATS), so loose files with their suffixes are found and kept."""
    wild = tmp_path / "wild"
    wild.mkdir()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8))
    for fmt, suffix in (("WEBP", "webp"), ("GIF", "gif"), ("BMP", "bmp"), ("PNG", "png")):
        (wild / f"x.{suffix}").write_bytes(_save(img, fmt))
    m = datasets.import_drop(Store.from_uri(f"file://{tmp_path}/store"), "d1", str(wild))
    assert m["count"] == 4 and m["skipped"] == 0
