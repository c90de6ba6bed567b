"""A run's report: ``metrics.json``, two plots, and the same content as Markdown, HTML and a terminal table.

The evaluate stage builds one metrics document (see :func:`write_report`) and this module renders it.
All three renderers share one layout: :func:`report_blocks` turns the metrics into a list of blocks
(headings, paragraphs, tables, images) and each renderer only decides how a block looks, so a number
is formatted in exactly one place. Plots use matplotlib's Agg canvas, imported only when drawing.
"""

from __future__ import annotations

import base64
import html
import io
import json
from datetime import UTC, datetime
from typing import Any

from .config import ConfigError
from .store import Store, join, run_prefix

EVALUATE_DIR = "evaluate"
METRICS = "metrics.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
RECALL_PLOT = "per_class_recall.png"
SELECTION_PLOT = "selection_histogram.png"
SAMPLES_IMAGE = "selection_samples.png"

MODEL_ORDER = ("teacher", "baseline", "student_pretrained", "student", "oracle")
MODEL_COLORS = {"teacher": "#4c72b0", "baseline": "#8c8c8c", "student_pretrained": "#dd8452",
                "student": "#55a868", "oracle": "#8172b3"}
COMPARISON_HEADER = ["model", "arch", "top-1", "top-5", "balanced acc", "tail recall", "head recall",
                     "val top-1"]
_COMPARISON_FIELDS = ("top1", "top5", "balanced_accuracy", "tail_recall", "head_recall", "val_top1")
MISSING = "-"
DROP_HEADER = ["drop", "images kept", "skipped", "skipped because"]
MAX_DROP_ROWS = 50  # a run may pool thousands of drops: list the first ones, total them all

Block = tuple  # ("h1"|"h2"|"p", text) | ("table", header, rows, align) | ("img", file, alt) | ("list", items)


# -- formatting (the only place numbers become text) -----------------------------------------------
def fmt_pct(x: float | None) -> str:
    """A fraction 0..1 as a percentage with one decimal: 0.8734 -> '87.3%'."""
    return MISSING if x is None else f"{100 * x:.1f}%"


def fmt_int(x: int | None) -> str:
    return MISSING if x is None else f"{x:,}"


def fmt_value(x: Any) -> str:
    if x is None:
        return MISSING
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, (list, tuple, dict)):
        return json.dumps(x, sort_keys=True)
    return str(x)


def _points(delta: float | None) -> str:
    return "n/a" if delta is None else f"{100 * delta:+.1f}"


def _get(d: Any, key: str) -> Any:
    return d.get(key) if isinstance(d, dict) else None


def _seq(x: Any) -> list:
    return list(x) if isinstance(x, (list, tuple)) else []


# -- shared content ---------------------------------------------------------------------------------
def present_models(metrics: dict) -> list[str]:
    """Model names in report order: the known five first, then any others the stage added."""
    models = metrics.get("models") or {}
    return [m for m in MODEL_ORDER if m in models] + sorted(m for m in models if m not in MODEL_ORDER)


def comparison_rows(metrics: dict) -> list[list[str]]:
    """One formatted row per model present, matching :data:`COMPARISON_HEADER`."""
    rows = []
    for name in present_models(metrics):
        m = metrics["models"][name] or {}
        rows.append([name, m.get("arch") or MISSING] + [fmt_pct(m.get(f)) for f in _COMPARISON_FIELDS])
    return rows


def _delta(metrics: dict, field: str, a: str = "student", b: str = "baseline") -> float | None:
    models = metrics.get("models") or {}
    x, y = _get(models.get(a), field), _get(models.get(b), field)
    return None if x is None or y is None else x - y


def gap_closed(metrics: dict) -> float | None:
    """(student - baseline) / (oracle - baseline) on test top-1, or None when it is undefined.

    Undefined means a model or its top-1 is missing, or the oracle does not beat the baseline
    (a gap of zero or less cannot be closed).
    """
    gain, gap = _delta(metrics, "top1"), _delta(metrics, "top1", "oracle", "baseline")
    if gain is None or gap is None or gap <= 0:
        return None
    return gain / gap


def comparison_lines(metrics: dict) -> list[str]:
    """The student-vs-baseline line and, with an oracle, the gap-closed line."""
    models = metrics.get("models") or {}
    lines = []
    if "student" in models and "baseline" in models:
        lines.append(f"student vs baseline: {_points(_delta(metrics, 'top1'))} top-1, "
                     f"{_points(_delta(metrics, 'tail_recall'))} tail recall")
    if "oracle" in models:
        closed = gap_closed(metrics)
        if closed is not None:
            lines.append(f"closes {100 * closed:.0f}% of the baseline→oracle top-1 gap")
        else:
            lines.append("baseline→oracle top-1 gap closed: n/a (no positive gap, or a model is missing)")
    return lines


def _classes(metrics: dict) -> list[str]:
    dataset = metrics.get("dataset") or {}
    classes = _seq(dataset.get("classes"))
    if classes:
        return [str(c) for c in classes]
    n = max([len(_seq(_get(m, "per_class_recall"))) for m in (metrics.get("models") or {}).values()]
            + [len(_seq(_get(metrics.get("selection"), "per_class_count")))] + [0])
    return [str(i) for i in range(n)]


def _name_list(classes: list[str], indices: list[int], limit: int = 10) -> str:
    """Class names for some indices, the first ``limit`` of them: 'three, seven' or 'a, b, … (+40)'."""
    names = [classes[i] if isinstance(i, int) and 0 <= i < len(classes) else str(i) for i in indices]
    return ", ".join(names[:limit]) + (f", … (+{len(names) - limit})" if len(names) > limit else "")


def _short_classes(metrics: dict) -> list[int]:
    return [i for i, s in enumerate(_seq(_get(metrics.get("selection"), "shortfall"))) if s and s > 0]


def selection_items(metrics: dict) -> list[tuple[str, str]]:
    """The selection summary as (label, value) pairs."""
    sel = metrics.get("selection")
    if not sel:
        return []
    classes, short = _classes(metrics), _short_classes(metrics)
    short_text = str(len(short))
    if short:
        short_text += f" ({_name_list(classes, short)})"
    policy = sel.get("policy") or "topk"
    items = [("policy", policy), ("K (per class)", fmt_int(sel.get("k"))), ("P (per image)", fmt_int(sel.get("p"))),
             ("images scored", fmt_int(sel.get("images_scored"))),
             ("candidates after the score-bin filter" if policy == "topk" else "candidates kept by the filter",
              fmt_int(sel.get("candidates"))),
             ("pairs selected", fmt_int(sel.get("selected_pairs"))),
             ("unique images", fmt_int(sel.get("unique_images"))),
             ("classes short of K", short_text),
             ("pseudo-label precision", fmt_pct(sel.get("pseudo_label_precision")))]
    if sel.get("distractors_selected") is not None:
        items.append(("distractors selected", fmt_int(sel.get("distractors_selected"))))
    return items


def selection_line(metrics: dict) -> str:
    sel = metrics.get("selection")
    if not sel:
        return "selection: none recorded"
    short = len(_short_classes(metrics))
    return (f"selection: K={fmt_int(sel.get('k'))} P={fmt_int(sel.get('p'))}, "
            f"{fmt_int(sel.get('images_scored'))} images scored, "
            f"{fmt_int(sel.get('selected_pairs'))} pairs selected "
            f"({fmt_int(sel.get('unique_images'))} unique images), "
            f"{short} classes short of K, "
            f"pseudo-label precision {fmt_pct(sel.get('pseudo_label_precision'))}")


def per_class_rows(metrics: dict) -> tuple[list[str], list[list[str]]]:
    dataset, sel = metrics.get("dataset") or {}, metrics.get("selection") or {}
    models = metrics.get("models") or {}
    counts, tail = _seq(dataset.get("train_class_counts")), set(_seq(dataset.get("tail_classes")))
    selected, precision = _seq(sel.get("per_class_count")), _seq(sel.get("per_class_precision"))
    recall_models = [m for m in ("baseline", "student") if m in models]
    header = ["class", "tail", "train", "selected", "precision"] + [f"{m} recall" for m in recall_models]

    def at(seq: list, i: int) -> Any:
        return seq[i] if i < len(seq) else None

    rows = []
    for i, name in enumerate(_classes(metrics)):
        row = [name, "yes" if i in tail else "", fmt_int(at(counts, i)), fmt_int(at(selected, i)),
               fmt_pct(at(precision, i))]
        row += [fmt_pct(at(_seq(_get(models[m], "per_class_recall")), i)) for m in recall_models]
        rows.append(row)
    return header, rows


def dataset_line(metrics: dict) -> str:
    ds = metrics.get("dataset") or {}
    classes, tail = _classes(metrics), _seq(ds.get("tail_classes"))
    drops = _seq(metrics.get("drops"))
    text = f"dataset {ds.get('name') or MISSING} {ds.get('version') or MISSING} ({len(classes)} classes"
    if tail:
        text += f", {len(tail)} tail: {_name_list(classes, tail)}"
    return text + ") · drops: " + (", ".join(map(str, drops)) if drops else "none")


def fmt_reasons(reasons: Any) -> str:
    """{reason: count} as '3 truncated, 1 not an image', most frequent first."""
    if not isinstance(reasons, dict):
        return MISSING
    items = sorted(((r, n) for r, n in reasons.items() if isinstance(n, int) and n), key=lambda rn: (-rn[1], rn[0]))
    return ", ".join(f"{n:,} {r}" for r, n in items)


def _drop_details(metrics: dict) -> list[dict]:
    # absent in runs evaluated before drops recorded their skipped images
    return [d for d in _seq(metrics.get("drop_details")) if isinstance(d, dict)]


def _drop_total(details: list[dict]) -> tuple[int | None, int | None, dict[str, int]]:
    def total(field: str) -> int | None:
        values = [d.get(field) for d in details]
        return sum(values) if all(isinstance(v, int) for v in values) else None

    reasons: dict[str, int] = {}
    for d in details:
        given = d.get("skipped_reasons")
        for r, n in (given.items() if isinstance(given, dict) else ()):
            if isinstance(n, int):
                reasons[r] = reasons.get(r, 0) + n
    return total("images"), total("skipped"), reasons


def drop_rows(metrics: dict) -> list[list[str]]:
    """Per drop: images kept, images skipped and why; a total row when there are several drops."""
    details = _drop_details(metrics)
    rows = [[str(d.get("drop_id") or MISSING), fmt_int(d.get("images")), fmt_int(d.get("skipped")),
             fmt_reasons(d.get("skipped_reasons"))] for d in details[:MAX_DROP_ROWS]]
    if len(details) > MAX_DROP_ROWS:
        rows.append([f"… {len(details) - MAX_DROP_ROWS:,} more", "", "", ""])
    if len(details) > 1:
        images, skipped, reasons = _drop_total(details)
        rows.append([f"all {len(details):,} drops", fmt_int(images), fmt_int(skipped), fmt_reasons(reasons)])
    return rows


def drops_line(metrics: dict) -> str | None:
    details = _drop_details(metrics)
    if not details:
        return None
    images, skipped, reasons = _drop_total(details)
    line = f"drops: {fmt_int(images)} images kept, {fmt_int(skipped)} skipped"
    return line + (f" ({fmt_reasons(reasons)})" if reasons else "")


def report_blocks(metrics: dict) -> list[Block]:
    """The report's content, renderer-independent."""
    run_id = metrics.get("run_id") or MISSING
    text_align = {"model", "arch", "class", "tail", "parameter", "value", "item", "drop", "skipped because"}
    blocks: list[Block] = [
        ("h1", f"semisup run {run_id}"),
        ("p", dataset_line(metrics) + f" · finished {metrics.get('finished_at') or MISSING}"),
        ("h2", "Models (held-out test set)"),
        ("table", COMPARISON_HEADER, comparison_rows(metrics),
         ["l" if h in text_align else "r" for h in COMPARISON_HEADER]),
    ]
    lines = comparison_lines(metrics)
    if lines:
        blocks.append(("list", lines))
    items = selection_items(metrics)
    if items:
        blocks += [("h2", "Selection"), ("table", ["item", "value"], [list(i) for i in items], ["l", "r"])]
    rows = drop_rows(metrics)
    if rows:
        blocks += [("h2", "Drops (unlabeled images)"),
                   ("table", DROP_HEADER, rows, ["l" if h in text_align else "r" for h in DROP_HEADER])]
    header, rows = per_class_rows(metrics)
    if rows:
        blocks += [("h2", "Per class"),
                   ("table", header, rows, ["l" if h in text_align else "r" for h in header])]
    blocks += [("h2", "Plots"), ("img", RECALL_PLOT, "per-class recall"),
               ("img", SELECTION_PLOT, "selected images per class")]
    if (metrics.get("selection") or {}).get("samples"):
        blocks += [("p", "Selected images, one row per class: the four most confident picks, then the four "
                         "nearest the class threshold."), ("img", SAMPLES_IMAGE, "selected image samples")]
    params = metrics.get("params") or {}
    if params:
        blocks += [("h2", "Parameters"),
                   ("table", ["parameter", "value"], [[k, fmt_value(params[k])] for k in sorted(params)],
                    ["l", "l"])]
    return blocks


# -- renderers --------------------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(metrics: dict) -> str:
    out: list[str] = []
    for block in report_blocks(metrics):
        kind = block[0]
        if kind == "h1":
            out.append(f"# {block[1]}")
        elif kind == "h2":
            out.append(f"## {block[1]}")
        elif kind == "p":
            out.append(block[1])
        elif kind == "list":
            out.append("\n".join(f"- {line}" for line in block[1]))
        elif kind == "img":
            out.append(f"![{block[2]}]({block[1]})")
        elif kind == "table":
            _, header, rows, align = block
            lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
                     "|" + "|".join("---:" if a == "r" else ":---" for a in align) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}th,td{border:1px solid #ccc;padding:.25em .6em}
th{background:#f3f3f3}td.r,th.r{text-align:right}td.l,th.l{text-align:left}
img{max-width:100%;display:block;margin:.5em 0 1.5em}"""


def render_html(metrics: dict, images: dict[str, bytes]) -> str:
    """A self-contained page: ``images`` maps plot file names to PNG bytes, embedded as data URIs."""
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{esc('semisup run ' + str(metrics.get('run_id') or MISSING))}</title>",
           f"<style>{_CSS}</style></head><body>"]
    for block in report_blocks(metrics):
        kind = block[0]
        if kind in ("h1", "h2", "p"):
            out.append(f"<{kind}>{esc(block[1])}</{kind}>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{esc(line)}</li>" for line in block[1]) + "</ul>")
        elif kind == "img":
            data = images.get(block[1])
            if data is None:
                out.append(f"<p>({esc(block[2])}: not available)</p>")
            else:
                b64 = base64.b64encode(data).decode("ascii")
                out.append(f'<img alt="{esc(block[2])}" title="{esc(block[1])}" '
                           f'src="data:image/png;base64,{b64}">')
        elif kind == "table":
            _, header, rows, align = block
            out.append("<table><thead><tr>"
                       + "".join(f'<th class="{a}">{esc(h)}</th>' for h, a in zip(header, align, strict=True))
                       + "</tr></thead><tbody>")
            for row in rows:
                out.append("<tr>" + "".join(f'<td class="{a}">{esc(c)}</td>'
                                            for c, a in zip(row, align, strict=True)) + "</tr>")
            out.append("</tbody></table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _text_table(header: list[str], rows: list[list[str]], align: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if a == "r" else c.ljust(w)
                         for c, w, a in zip(cells, widths, align, strict=True)).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def render_table(metrics: dict) -> str:
    """The model comparison as a fixed-width plain-text table, for terminals (``semisup report``)."""
    align = ["l", "l"] + ["r"] * (len(COMPARISON_HEADER) - 2)
    parts = [f"run {metrics.get('run_id') or MISSING} (finished {metrics.get('finished_at') or MISSING})",
             dataset_line(metrics), "",
             _text_table(COMPARISON_HEADER, comparison_rows(metrics), align), ""]
    parts += comparison_lines(metrics)
    parts.append(selection_line(metrics))
    line = drops_line(metrics)
    if line:
        parts.append(line)
    return "\n".join(parts)


# -- plots ------------------------------------------------------------------------------------------
def _figure(n_classes: int) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(min(max(7.0, 0.45 * n_classes + 2.5), 24.0), 4.8), dpi=100,
                 layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _class_axis(ax: Any, classes: list[str]) -> None:
    n = len(classes)
    ax.set_xlim(-0.6, n - 0.4)
    if n <= 60:
        ax.set_xticks(range(n))
        long = max((len(c) for c in classes), default=0) > 4
        ax.set_xticklabels(classes, rotation=45 if long else 0, ha="right" if long else "center", fontsize=8)
        ax.set_xlabel("class")
    else:
        ax.set_xlabel(f"class index (0–{n - 1})")


def _empty(fig: Any, message: str) -> None:
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def plot_per_class_recall(metrics: dict) -> bytes:
    """Grouped bars: per-class recall of every model that has it; tail classes shaded."""
    classes = _classes(metrics)
    models = [(m, _seq(_get(metrics["models"][m], "per_class_recall"))) for m in present_models(metrics)]
    models = [(m, r) for m, r in models if r]
    fig = _figure(len(classes))
    if not models or not classes:
        _empty(fig, "no per-class recall recorded")
        return figure_png(fig)
    ax = fig.add_subplot()
    for i in _seq(_get(metrics.get("dataset"), "tail_classes")):
        ax.axvspan(i - 0.5, i + 0.5, color="#f2e6c9", zorder=0, lw=0)
    width = 0.8 / len(models)
    for j, (name, recall) in enumerate(models):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(recall))]
        ax.bar(xs, [r if r is not None else 0.0 for r in recall], width=width, label=name,
               color=MODEL_COLORS.get(name), zorder=2)
    _class_axis(ax, classes)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("recall")
    ax.set_title("Per-class recall on the test set (tail classes shaded)")  # run id is in the report
    ax.grid(axis="y", alpha=0.3, zorder=1)
    fig.legend(fontsize=8, ncol=len(models), loc="outside lower center", frameon=False)
    return figure_png(fig)


def plot_selection_histogram(metrics: dict) -> bytes:
    """Selected images per class with K as a line; per-class pseudo-label precision on a second axis."""
    sel = metrics.get("selection") or {}
    classes, counts = _classes(metrics), _seq(sel.get("per_class_count"))
    fig = _figure(len(classes))
    if not counts:
        _empty(fig, "no selection recorded")
        return figure_png(fig)
    ax = fig.add_subplot()
    tail = set(_seq(_get(metrics.get("dataset"), "tail_classes")))
    colors = ["#dd8452" if i in tail else "#4c72b0" for i in range(len(counts))]
    ax.bar(range(len(counts)), [c or 0 for c in counts], color=colors, width=0.7, zorder=2)
    k = sel.get("k")
    if k is not None:
        ax.axhline(k, color="#c44e52", ls="--", lw=1.5, zorder=3, label=f"K = {k:,}")
    _class_axis(ax, classes)
    ax.set_ylim(0, max([k or 0, *(c or 0 for c in counts)]) * 1.15 or 1)
    ax.set_ylabel("selected images")
    ax.grid(axis="y", alpha=0.3, zorder=1)
    from matplotlib.patches import Patch

    handles, labels = ax.get_legend_handles_labels()
    handles.append(Patch(color="#4c72b0"))
    labels.append("selected, head class" if tail else "selected")
    if tail:
        handles.append(Patch(color="#dd8452"))
        labels.append("selected, tail class")
    precision = _seq(sel.get("per_class_precision"))
    title = "Selected images per class"
    if any(p is not None for p in precision):
        ax2 = ax.twinx()
        pts = [(i, p) for i, p in enumerate(precision) if p is not None]
        ax2.plot([i for i, _ in pts], [p for _, p in pts], "o", color="#2d2d2d", zorder=4,
                 ms=5 if len(counts) <= 60 else 2, label="pseudo-label precision")
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("pseudo-label precision")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if sel.get("pseudo_label_precision") is not None:
        title += f" (overall pseudo-label precision {fmt_pct(sel['pseudo_label_precision'])})"
    ax.set_title(title)
    fig.legend(handles, labels, fontsize=8, ncol=len(labels), loc="outside lower center", frameon=False)
    return figure_png(fig)


# -- store I/O --------------------------------------------------------------------------------------
def report_prefix(run_id: str) -> str:
    return join(run_prefix(run_id), EVALUATE_DIR)


def write_report(store: Store, run_id: str, metrics: dict, samples: bytes | None = None) -> dict[str, str]:
    """Write metrics.json, the two plots, report.md and report.html under ``runs/<run_id>/evaluate/``.

    Returns ``{file name: URI}`` for the five files. The metrics and plots are written before the
    reports that point at them, so a reader never finds a report without its data.
    """
    prefix = report_prefix(run_id)
    urls: dict[str, str] = {}

    def put(name: str, data: bytes) -> None:
        key = join(prefix, name)
        store.write_bytes(key, data)
        urls[name] = store.url(key)

    put(METRICS, json.dumps(metrics, indent=2, sort_keys=True).encode())
    images = {RECALL_PLOT: plot_per_class_recall(metrics), SELECTION_PLOT: plot_selection_histogram(metrics)}
    if samples is not None:  # thumbnails of the selection, drawn by the select stage
        images[SAMPLES_IMAGE] = samples
    for name, data in images.items():
        put(name, data)
    put(REPORT_MD, render_markdown(metrics).encode())
    put(REPORT_HTML, render_html(metrics, images).encode())
    return urls


def _finished(metrics: Any) -> datetime:
    try:
        ts = datetime.fromisoformat(str(metrics.get("finished_at")))
    except (AttributeError, TypeError, ValueError):
        return datetime.min.replace(tzinfo=UTC)
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def finished_runs(store: Store) -> list[str]:
    """Run ids that have a metrics.json, sorted by name."""
    suffix = (EVALUATE_DIR, METRICS)
    return sorted({key.split("/")[1] for key in store.list("runs")
                   if len(key.split("/")) == 4 and tuple(key.split("/")[2:]) == suffix})


def load_metrics(store: Store, run: str = "latest") -> dict:
    """The metrics of one run, or of the run that finished last (``run="latest"``)."""
    if run in (None, "", "latest"):
        runs = finished_runs(store)
        if not runs:
            raise ConfigError(f"No finished run in the store {store.uri}; "
                              "run the pipeline first (make demo).")
        loaded = [(store.read_json(join(report_prefix(r), METRICS)), r) for r in runs]
        return max(loaded, key=lambda mr: (_finished(mr[0]), mr[1]))[0]
    key = join(report_prefix(run), METRICS)
    if not store.exists(key):
        if store.list(run_prefix(run)):
            raise ConfigError(f"Run {run!r} in the store {store.uri} has no metrics yet; its evaluate stage "
                              "has not finished (re-run the pipeline for it).")
        known = finished_runs(store)
        hint = f"finished runs: {', '.join(known)}" if known else "the store has no finished run"
        raise ConfigError(f"No run {run!r} in the store {store.uri} ({hint}); pass one of those or 'latest'.")
    return store.read_json(key)
