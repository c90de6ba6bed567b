"""Bad input through the real ``semisup`` command: each mistake a user can make ends, before any
expensive work, in exit status 2 and one sentence on stderr's last line that names the offending
thing and the fix; no traceback, no result document, and the store keeps every byte it had.

Every case runs the CLI in a subprocess, as Airflow's runners and a user at a shell do. The
unreachable S3 endpoint and corrupt images are tested elsewhere (test_store.py, test_datasets.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from semisup_tasks import datasets
from semisup_tasks.images import encode_png
from semisup_tasks.store import Store

REPO = Path(__file__).resolve().parents[1]
USER_ERROR = 2  # semisup_tasks.cli.USER_ERROR; literal here so a change to it is a deliberate one
CLASSES = ["left", "middle", "right"]
RUN_PARAMS = {"dataset": "tiny", "teacher_arch": "cnn_small", "teacher_epochs": 1, "pretrain_epochs": 1,
              "finetune_epochs": 1, "k": 4, "p": 2, "batch_size": 8, "augment": "none"}


def _png(rng: np.random.Generator, cls: int, size: int = 12) -> bytes:
    img = rng.integers(0, 60, (size, size), dtype=np.uint8)
    img[:, 1 + cls * 4:3 + cls * 4] = 255
    return encode_png(img)


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny store: dataset tiny/v1 (3 classes) and drops d1, d2. Every case must leave it as it is."""
    root = tmp_path_factory.mktemp("bad-input") / "store"
    store = Store.from_uri(f"file://{root}")
    rng = np.random.default_rng(0)

    def rows(prefix: str, n: int):
        return [(f"{prefix}-{i}", _png(rng, i % 3), i % 3) for i in range(n)]

    datasets.write_dataset(store, "tiny", "v1", CLASSES, 1, [12, 12],
                           {"train": rows("train", 12), "val": rows("val", 3), "test": rows("test", 6)},
                           source="test")
    for drop in ("d1", "d2"):
        datasets.write_drop(store, drop, [(f"img-{i}.png", _png(rng, i % 3)) for i in range(6)], source="test")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageFolder sources, good and malformed, side by side."""
    base = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(1)

    def image(path: Path, cls: int = 0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png(rng, cls))

    (base / "empty").mkdir()
    for cls in ("cat", "dog"):  # class folders, but nothing in them is an image
        (base / "no-images" / cls).mkdir(parents=True)
        (base / "no-images" / cls / "README.txt").write_text("not an image")
    for i in range(4):
        image(base / "flat" / f"{i}.png", i % 3)  # images only at the root: no class folder
        image(base / "parent" / "mnist" / str(i % 2) / f"{i}.png", i % 2)  # --root one level too high
    (base / "a-file.png").write_bytes(_png(rng, 1))
    return base


def semisup(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semisup_tasks", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})}, cwd=REPO)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under the store root, with its bytes (hidden temp files included)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_refused(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, no traceback, no result, and one sentence naming ``fragments`` (regexes) on the last line."""
    assert proc.returncode == USER_ERROR, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stdout == "", "a refused command printed a result document"
    last = proc.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("semisup: error: "), last
    sentence = last.removeprefix("semisup: error: ")
    assert sentence.endswith("."), sentence
    assert not re.search(r"[.!?]\s+[A-Z]", sentence[:-1]), f"more than one sentence: {sentence}"
    for fragment in fragments:
        assert re.search(fragment, sentence), f"{fragment!r} not in {sentence!r}"
    assert " epoch " not in proc.stderr, "training started before the input was refused"
    return sentence


def params(**extra) -> str:
    return json.dumps({**RUN_PARAMS, **extra})


# (case id, CLI arguments after the store, regexes the sentence must hold: the thing, then the fix)
PARAM_CASES = [
    ("k-zero", ["run", "--run-id", "r1", "--params-json", params(k=0)], [r"Parameter k\b", "at least 1", r"got 0\b"]),
    ("k-negative", ["run", "--run-id", "r1", "--params-json", params(k=-1)], [r"Parameter k\b", "at least 1", "-1"]),
    ("p-zero", ["run", "--run-id", "r1", "--params-json", params(p=0)], [r"Parameter p\b", "at least 1"]),
    ("p-above-classes", ["run", "--run-id", "r1", "--params-json", params(p=4)],
     [r"p=4", "3 classes", "'tiny'", "between 1 and 3"]),
    ("p-above-classes-plan-stage", ["stage", "plan", "--run-id", "r1", "--params-json", params(p=4)],
     [r"p=4", "between 1 and 3"]),
    ("teacher-arch-unknown", ["run", "--run-id", "r1", "--params-json", params(teacher_arch="vgg99")],
     ["teacher_arch", "one of .*cnn_small", "'vgg99'"]),
    ("teacher-arch-unknown-stage", ["stage", "train-teacher", "--run-id", "r1", "--params-json",
                                    params(teacher_arch="vgg99")], ["teacher_arch", "one of .*resnet18"]),
    ("student-arch-unknown", ["run", "--run-id", "r1", "--params-json", params(student_arch="vit_huge")],
     ["student_arch", "one of .*cnn_small", "'vit_huge'"]),
    ("unknown-param", ["run", "--run-id", "r1", "--params-json", params(teacher_epoch=3)],
     ["Unknown parameter", "teacher_epoch", "did you mean teacher_epochs", "remove"]),
    ("k-not-a-number", ["run", "--run-id", "r1", "--params-json", params(k="ten")],
     [r"Parameter k\b", "an integer", "'ten'"]),
    ("k-fractional", ["run", "--run-id", "r1", "--params-json", params(k=2.5)], [r"Parameter k\b", "an integer"]),
    ("drops-not-a-list", ["run", "--run-id", "r1", "--params-json", params(drops="d1")],
     ["Parameter drops", "a list"]),
    ("params-not-json", ["run", "--run-id", "r1", "--params-json", "{k: 10}"],
     ["--params-json", "not valid JSON", "JSON object like"]),
    ("params-not-an-object", ["stage", "plan", "--run-id", "r1", "--params-json", "[10]"],
     ["--params-json", "JSON object like"]),
    ("dataset-missing", ["run", "--run-id", "r1", "--params-json", params(dataset="cifar")],
     ["Dataset 'cifar'", "semisup import-imagefolder", "--name cifar"]),
    ("dataset-version-missing", ["run", "--run-id", "r1", "--params-json", params(dataset_version="v7")],
     ["Dataset 'tiny'", "version v7", "it has v1", "semisup import-imagefolder"]),
    ("drop-missing", ["run", "--run-id", "r1", "--params-json", params(drops=["d1", "d9"])],
     ["Drop 'd9'", "semisup import-drop", "--drop-id d9"]),
    ("drop-twice", ["run", "--run-id", "r1", "--params-json", params(drops=["d1", "d1"])],
     ["d1", "more than once", "list each once"]),
    ("stage-unknown", ["stage", "train-teacherr", "--run-id", "r1"], ["Unknown stage 'train-teacherr'", "plan"]),
    ("stage-before-plan", ["stage", "train-teacher", "--run-id", "r1", "--params-json", params()],
     ["Run 'r1' has no plan", "run the plan stage first"]),
    ("report-unknown-run", ["report", "--run", "r404"], ["'r404'", "'latest'"]),
]


@pytest.mark.parametrize("argv, fragments", [c[1:] for c in PARAM_CASES], ids=[c[0] for c in PARAM_CASES])
def test_bad_params_and_missing_inputs_are_refused_before_any_work(store_root, argv, fragments):
    before = snapshot(store_root)
    proc = semisup(*argv[:2 if argv[0] == "stage" else 1], "--store", f"file://{store_root}",
                   *argv[2 if argv[0] == "stage" else 1:])
    assert_refused(proc, *fragments)
    assert snapshot(store_root) == before  # nothing written, nothing lost: no run folder, no model.pt


@pytest.mark.parametrize("uri, fragments", [
    ("gs://bucket/semisup", ["'gs://bucket/semisup'", "file://PATH or s3://BUCKET/PREFIX"]),
    ("ftp://host/store", ["'ftp://host/store'", "file://PATH or s3://BUCKET/PREFIX"]),
    ("s3:///no-bucket", ["no bucket", "s3://bucket/prefix"]),
], ids=["gs", "ftp", "s3-without-bucket"])
def test_a_store_uri_with_an_unknown_scheme_is_refused(uri, fragments, tmp_path):
    proc = semisup("stage", "plan", "--store", uri, "--run-id", "r1", "--params-json", params())
    assert_refused(proc, *fragments)
    assert not any(tmp_path.iterdir())


def test_a_store_that_cannot_be_created_is_refused(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the store's parent folder should be")
    proc = semisup("run", "--store", f"file://{blocker}/store", "--run-id", "r1", "--params-json", params())
    assert_refused(proc, re.escape(f"file://{blocker}/store"), "Not a directory", "pick a writable folder")
    assert blocker.read_text().startswith("a file")


def _read_only(path: Path, argv: list[str]) -> list[str]:
    """``argv`` run with ``path`` read-only: file modes for a normal user; root ignores modes, so for root
    a private mount namespace bind-mounts the folder read-only over itself (util-linux unshare)."""
    if os.geteuid() != 0:
        for p in [path, *path.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
        return argv
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", 'mount --bind -o ro "$0" "$0"', str(path)],
                           capture_output=True, text=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("running as root without unshare/mount: cannot make a folder read-only")
    return ["unshare", "--mount", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(path), *argv]


def test_a_read_only_store_is_refused_before_training(store_root, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(store_root, root)
    planned = semisup("stage", "plan", "--store", f"file://{root}", "--run-id", "r1", "--params-json", params())
    assert planned.returncode == 0, planned.stderr
    before = snapshot(root)
    argv = [sys.executable, "-m", "semisup_tasks", "stage", "train-teacher", "--store", f"file://{root}",
            "--run-id", "r1", "--params-json", params()]
    try:
        proc = subprocess.run(_read_only(root, argv), capture_output=True, text=True, timeout=120, cwd=REPO)
    finally:
        for p in [root, *root.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
    assert_refused(proc, re.escape(str(root)), "writable")
    assert snapshot(root) == before
    assert not (root / "runs" / "r1" / "teacher").exists()


# -- imports: ImageFolder trees and drops --------------------------------------------------------

IMPORT_CASES = [
    ("imagefolder-missing", ["import-imagefolder", "--name", "new", "--root", "{base}/nowhere"],
     ["{base}/nowhere", "does not exist", "existing local folder"]),
    ("imagefolder-empty", ["import-imagefolder", "--name", "new", "--root", "{base}/empty"],
     ["{base}/empty", "no .png/.jpg/.jpeg/.webp/.gif/.bmp images", "one subfolder of images per class"]),
    ("imagefolder-class-folders-without-images", ["import-imagefolder", "--name", "new", "--root",
                                                  "{base}/no-images"],
     ["{base}/no-images", "no .png/.jpg/.jpeg/.webp/.gif/.bmp images", "one subfolder of images per class"]),
    ("imagefolder-images-only-at-root", ["import-imagefolder", "--name", "new", "--root", "{base}/flat"],
     ["{base}/flat", "no class subfolders", "one subfolder of images per class"]),
    ("imagefolder-a-single-class", ["import-imagefolder", "--name", "new", "--root", "{base}/parent"],
     ["{base}/parent", "single class folder", "at least two", "point --root at it"]),
    ("imagefolder-bad-fractions", ["import-imagefolder", "--name", "new", "--root", "{base}/parent/mnist",
                                   "--val-fraction", "0.6", "--test-fraction", "0.5"],
     ["val_fraction 0.6", "sum to less than 1"]),
    ("imagefolder-bad-name", ["import-imagefolder", "--name", "../up", "--root", "{base}/parent/mnist"],
     ["'../up'", "letters, digits"]),
    ("imagefolder-existing-version", ["import-imagefolder", "--name", "tiny", "--version", "v1", "--root",
                                      "{base}/parent/mnist"], ["'tiny'", "v1", "already exists"]),
    ("drop-source-missing", ["import-drop", "--drop-id", "d3", "--source", "{base}/nowhere"],
     ["{base}/nowhere", "does not exist", "existing local folder"]),
    ("drop-source-without-images", ["import-drop", "--drop-id", "d3", "--source", "{base}/no-images"],
     ["{base}/no-images", "no .png/.jpg/.jpeg/.webp/.gif/.bmp images", "point --source at"]),
    ("drop-bad-id", ["import-drop", "--drop-id", "a/b", "--source", "{base}/flat"], ["'a/b'", "letters, digits"]),
]
XFAIL_IMPORT_CASES = [
    pytest.param(["import-imagefolder", "--name", "new", "--root", "{base}/a-file.png"],
                 ["{base}/a-file.png", "not a folder"], id="imagefolder-root-is-a-file"),
]


@pytest.mark.parametrize("argv, fragments", [pytest.param(*c[1:], id=c[0]) for c in IMPORT_CASES]
                         + XFAIL_IMPORT_CASES)
def test_bad_imports_are_refused_and_write_nothing(store_root, folders, argv, fragments):
    before = snapshot(store_root)
    sources = snapshot(folders)
    argv = [a.replace("{base}", str(folders)) for a in argv]
    proc = semisup(argv[0], "--store", f"file://{store_root}", *argv[1:])
    assert_refused(proc, *[re.escape(str(folders)).join(f.split("{base}")) if "{base}" in f else f
                           for f in fragments])
    assert snapshot(store_root) == before  # no half-written dataset or drop, nothing overwritten
    assert snapshot(folders) == sources  # the source is only read
