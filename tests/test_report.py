"""The run report: files, plots, tables, gap arithmetic, and picking the latest run."""

from __future__ import annotations

import base64
import copy
import json
import re

import pytest

from semisup_tasks import report
from semisup_tasks.config import ConfigError
from semisup_tasks.store import Store

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TAIL = [3, 7]


def _model(arch: str, top1: float, top5: float, tail: float, head: float, val: float, base: float) -> dict:
    recall = [round(min(1.0, base + 0.01 * i) - (0.2 if i in TAIL else 0.0), 4) for i in range(10)]
    return {"arch": arch, "top1": top1, "top5": top5, "balanced_accuracy": top1 - 0.01, "tail_recall": tail,
            "head_recall": head, "per_class_recall": recall, "val_top1": val}


@pytest.fixture
def metrics() -> dict:
    return {
        "run_id": "run-a",
        "finished_at": "2025-03-01T12:00:00+00:00",
        "dataset": {"name": "mnist-demo", "version": "v1", "classes": CLASSES,
                    "train_class_counts": [500, 500, 500, 20, 500, 500, 500, 20, 500, 500],
                    "tail_classes": TAIL},
        "drops": ["drop-001", "drop-002"],
        "models": {
            "teacher": _model("cnn_large", 0.912, 0.991, 0.701, 0.951, 0.905, 0.85),
            "baseline": _model("cnn_small", 0.80, 0.97, 0.40, 0.88, 0.79, 0.75),
            "student_pretrained": _model("cnn_small", 0.7234, 0.95, 0.55, 0.76, 0.72, 0.65),
            "student": _model("cnn_small", 0.86, 0.985, 0.65, 0.91, 0.85, 0.80),
            "oracle": _model("cnn_small", 0.90, 0.99, 0.80, 0.93, 0.89, 0.84),
        },
        "selection": {"k": 250, "p": 3, "images_scored": 60000, "rows_scored": 180000, "selected_pairs": 2440,
                      "unique_images": 2301, "per_class_count": [250] * 3 + [190] + [250] * 3 + [250] * 3,
                      "shortfall": [0, 0, 0, 60, 0, 0, 0, 0, 0, 0],
                      "threshold": [0.99, 0.98, 0.97, None, 0.95, 0.96, 0.97, 0.5, 0.98, 0.97],
                      "pseudo_label_precision": 0.9123,
                      "per_class_precision": [0.98, 0.99, 0.95, 0.6, 0.97, 0.96, 0.94, 0.7, 0.93, None],
                      "distractors_selected": 12},
        "params": {"k": 250, "p": 3, "teacher_arch": "cnn_large", "student_arch": "cnn_small", "drops": [],
                   "lr": 0.05, "oracle": True},
    }


@pytest.fixture
def store(tmp_path) -> Store:
    return Store.from_uri("file://" + str(tmp_path))


def test_write_report_writes_all_files(store, metrics):
    urls = report.write_report(store, "run-a", metrics)
    names = {"metrics.json", "report.md", "report.html", "per_class_recall.png", "selection_histogram.png"}
    assert set(urls) == names
    prefix = "runs/run-a/evaluate/"
    assert set(store.list(prefix.rstrip("/"))) == {prefix + n for n in names}
    for name, url in urls.items():
        assert url == store.url(prefix + name)
    assert store.read_json(prefix + "metrics.json") == metrics
    for plot in ("per_class_recall.png", "selection_histogram.png"):
        data = store.read_bytes(prefix + plot)
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 5_000


def test_markdown_report_content(store, metrics):
    report.write_report(store, "run-a", metrics)
    md = store.read_bytes("runs/run-a/evaluate/report.md").decode()
    assert md.startswith("# semisup run run-a")
    assert "mnist-demo v1" in md and "drop-001, drop-002" in md
    for model in report.MODEL_ORDER:
        assert f"| {model} |" in md
    assert "student vs baseline: +6.0 top-1, +25.0 tail recall" in md
    assert "closes 60% of the baseline→oracle top-1 gap" in md
    assert "| pseudo-label precision | 91.2% |" in md
    assert "| classes short of K | 1 (three) |" in md
    assert "| three | yes | 20 | 190 | 60.0% |" in md  # per-class row: tail, train count, selected, precision
    assert "](per_class_recall.png)" in md and "](selection_histogram.png)" in md
    assert "| teacher_arch | cnn_large |" in md


def test_render_table_rows_and_percentages(metrics):
    text = report.render_table(metrics)
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
    model_lines = lines[start:lines.index("", start)]  # the table body ends at the blank line
    rows = {line.split()[0]: line.split() for line in model_lines}
    assert list(rows) == list(report.MODEL_ORDER)
    assert rows["teacher"][1:] == ["cnn_large", "91.2%", "99.1%", "90.2%", "70.1%", "95.1%", "90.5%"]
    assert rows["student_pretrained"][2] == "72.3%"
    assert rows["student"][2] == "86.0%"
    assert "student vs baseline: +6.0 top-1, +25.0 tail recall" in text
    assert "closes 60% of the baseline→oracle top-1 gap" in text
    sel = [line for line in lines if line.startswith("selection:")]
    assert len(sel) == 1 and "K=250 P=3" in sel[0] and "60,000 images scored" in sel[0]
    assert "1 classes short of K" in sel[0] and "91.2%" in sel[0]
    # fixed width: the numeric columns of the model rows line up
    assert len({line.index("%") for line in model_lines}) == 1


def test_gap_closed_arithmetic(metrics):
    assert report.gap_closed(metrics) == pytest.approx(0.6)
    m = copy.deepcopy(metrics)
    m["models"]["student"]["top1"] = 0.95  # beats the oracle: more than the whole gap
    assert report.gap_closed(m) == pytest.approx(1.5)
    m["models"]["student"]["top1"] = 0.75  # worse than the baseline
    assert report.gap_closed(m) == pytest.approx(-0.5)
    m["models"]["oracle"]["top1"] = 0.80  # no gap to close
    assert report.gap_closed(m) is None
    m["models"]["oracle"]["top1"] = 0.70
    assert report.gap_closed(m) is None
    assert "n/a" in report.render_table(m)
    m["models"]["student"]["top1"] = None
    assert report.gap_closed(m) is None


def test_missing_oracle(store, metrics):
    del metrics["models"]["oracle"]
    metrics["selection"]["pseudo_label_precision"] = None
    metrics["selection"]["per_class_precision"] = None
    metrics["selection"]["distractors_selected"] = None
    assert report.gap_closed(metrics) is None
    text = report.render_table(metrics)
    assert "oracle" not in text and "gap" not in text
    assert "student vs baseline: +6.0 top-1" in text
    urls = report.write_report(store, "run-a", metrics)
    md = store.read_bytes("runs/run-a/evaluate/report.md").decode()
    assert "| oracle | cnn_small" not in md and "closes" not in md
    assert "| pseudo-label precision | - |" in md
    assert store.read_bytes("runs/run-a/evaluate/selection_histogram.png").startswith(PNG_MAGIC)
    assert len(urls) == 5


def test_sparse_metrics_still_render(store):
    minimal = {"run_id": "r", "finished_at": None, "dataset": None, "drops": [], "models": {},
               "selection": None, "params": {}}
    report.write_report(store, "r", minimal)
    assert store.read_bytes("runs/r/evaluate/per_class_recall.png").startswith(PNG_MAGIC)
    assert "selection: none recorded" in report.render_table(minimal)


def test_html_embeds_base64_pngs(store, metrics):
    report.write_report(store, "run-a", metrics)
    page = store.read_bytes("runs/run-a/evaluate/report.html").decode()
    assert page.startswith("<!DOCTYPE html>")
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == 2
    assert base64.b64decode(embedded[0]) == store.read_bytes("runs/run-a/evaluate/per_class_recall.png")
    assert all(base64.b64decode(e).startswith(PNG_MAGIC) for e in embedded)
    assert 'src="per_class_recall.png"' not in page  # self-contained: no file references
    assert "closes 60% of the baseline→oracle top-1 gap" in page
    assert "<td class=\"r\">91.2%</td>" in page


def test_html_escapes_class_names(store, metrics):
    metrics["dataset"]["classes"][0] = "<b>&zero</b>"
    report.write_report(store, "run-a", metrics)
    page = store.read_bytes("runs/run-a/evaluate/report.html").decode()
    assert "<b>&zero</b>" not in page and "&lt;b&gt;&amp;zero&lt;/b&gt;" in page


def test_load_latest_by_finished_at(store, metrics):
    older, newer = copy.deepcopy(metrics), copy.deepcopy(metrics)
    newer["run_id"], newer["finished_at"] = "a-newer", "2025-03-02T08:00:00Z"
    older["run_id"], older["finished_at"] = "z-older", "2025-03-01T23:00:00+00:00"
    report.write_report(store, "a-newer", newer)
    report.write_report(store, "z-older", older)  # written last and sorts last by name, but finished first
    store.write_bytes("runs/unfinished/score/part-00000.parquet", b"x")
    assert report.load_metrics(store)["run_id"] == "a-newer"
    assert report.load_metrics(store, "latest")["run_id"] == "a-newer"
    assert report.load_metrics(store, "z-older")["run_id"] == "z-older"


def test_load_metrics_errors(store, metrics):
    with pytest.raises(ConfigError, match=r"No finished run in the store file://.*make demo"):
        report.load_metrics(store)
    report.write_report(store, "run-a", metrics)
    with pytest.raises(ConfigError, match="'nope'.*run-a"):
        report.load_metrics(store, "nope")
    store.write_bytes("runs/half/train-teacher/_SUCCESS.json", json.dumps({}).encode())
    with pytest.raises(ConfigError, match="'half'.*no metrics yet"):
        report.load_metrics(store, "half")
    # a path-like run id is sanitised into a plain name: it can only miss, never escape the store
    with pytest.raises(ConfigError, match=r"No run '\.\./etc'"):
        report.load_metrics(store, "../etc")


def test_cli_report_prints_table(store, metrics, capsys):
    from semisup_tasks.cli import main

    report.write_report(store, "run-a", metrics)
    assert main(["report", "--store", store.uri]) == 0
    out = capsys.readouterr().out
    assert "student_pretrained" in out and "closes 60%" in out
    assert main(["report", "--store", store.uri, "--run", "missing"]) == 2


DROP_DETAILS = [
    {"drop_id": "drop-001", "images": 12000, "skipped": 3, "skipped_reasons": {"not an image": 1, "truncated": 2}},
    {"drop_id": "drop-002", "images": 9500, "skipped": 0, "skipped_reasons": {}},
]


def test_drops_section_shows_kept_and_skipped_images_per_drop(store, metrics):
    metrics["drop_details"] = DROP_DETAILS
    report.write_report(store, "run-a", metrics)
    md = store.read_bytes("runs/run-a/evaluate/report.md").decode()
    assert "## Drops (unlabeled images)" in md
    assert "| drop | images kept | skipped | skipped because |" in md
    assert "| drop-001 | 12,000 | 3 | 2 truncated, 1 not an image |" in md  # most frequent reason first
    assert "| drop-002 | 9,500 | 0 |  |" in md
    assert "| all 2 drops | 21,500 | 3 | 2 truncated, 1 not an image |" in md
    assert md.index("## Drops") < md.index("## Per class")
    page = store.read_bytes("runs/run-a/evaluate/report.html").decode()
    assert "<td class=\"l\">2 truncated, 1 not an image</td>" in page
    assert "drops: 21,500 images kept, 3 skipped (2 truncated, 1 not an image)" in report.render_table(metrics)


def test_drops_section_absent_for_older_runs_and_tolerant_of_odd_entries(store, metrics):
    report.write_report(store, "run-a", metrics)  # no drop_details key: evaluated before it existed
    md = store.read_bytes("runs/run-a/evaluate/report.md").decode()
    assert "## Drops" not in md
    assert not any(line.startswith("drops:") for line in report.render_table(metrics).splitlines())

    metrics["drop_details"] = [{"drop_id": "d1", "images": 5, "skipped": None, "skipped_reasons": None},
                               "not a dict", {"drop_id": "d2", "images": 7, "skipped": 1,
                                              "skipped_reasons": ["truncated"]}]
    md = report.render_markdown(metrics)
    assert "| d1 | 5 | - | - |" in md and "| d2 | 7 | 1 | - |" in md
    assert "| all 2 drops | 12 | - |  |" in md  # a total over unknowns is unknown, not a wrong number


def test_drops_section_lists_the_first_drops_and_totals_them_all(metrics):
    n = report.MAX_DROP_ROWS + 7
    metrics["drop_details"] = [{"drop_id": f"d{i:03d}", "images": 10, "skipped": 1,
                                "skipped_reasons": {"empty file": 1}} for i in range(n)]
    rows = report.drop_rows(metrics)
    assert len(rows) == report.MAX_DROP_ROWS + 2
    assert rows[-2][0] == "… 7 more"
    assert rows[-1] == [f"all {n} drops", f"{10 * n}", f"{n}", f"{n} empty file"]
