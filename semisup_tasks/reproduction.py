"""``REPRODUCTION.md`` and the study plots from an experiment's ``results.json``.

Each of the paper's findings and its six recommendations (``shared/reference/method.md`` §4) is a
comparison of two settings of the grid, measured on the test split as a paired difference over seeds
(a seed fixes the teacher, the baseline and the data order, so seeds pair). The verdict reads the 95%
t-interval of that difference: above 0 agrees, below 0 disagrees, otherwise the direction is named but
the difference is within the seed-to-seed noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .experiments import paired_difference
from .report import figure_png

# two-sided 95% Student t quantiles by degrees of freedom (n seeds - 1); between two tabled values the
# smaller degrees of freedom's is used (a wider interval)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000}

MODEL_LABELS = {"student": "student (pre-trained, fine-tuned)", "student_pretrained": "student before fine-tuning",
                "teacher": "teacher", "baseline": "baseline (labeled only)"}


@dataclass(frozen=True)
class Finding:
    id: str
    source: str
    claim: str
    study: str | None  # the grid study it reads (None: the base setting, or transfer)
    metric: str = "student.top1"


FINDINGS = (
    Finding("semi-supervised", "paper, main result", "The student, pre-trained on the teacher's selection and "
            "fine-tuned, beats the same architecture trained on the labeled set alone.", None),
    Finding("rec1-self-training", "recommendation 1", "Teacher/student training helps even when teacher and "
            "student have the same architecture (self-training beats the baseline).", "teacher_arch"),
    Finding("rec1-teacher-capacity", "recommendation 1 and the teacher-capacity study", "A higher-capacity teacher "
            "gives a better student of fixed size than self-training does.", "teacher_arch"),
    Finding("rec2-fine-tune", "recommendation 2", "Fine-tune the model with true labels only: fine-tuning the "
            "pre-trained student on the labeled set improves it.", None),
    Finding("rec3-pool-size", "recommendation 3", "A large-scale unlabeled dataset is key: a larger pool gives a "
            "better student.", "pool_fraction"),
    Finding("rec4-pretrain-length", "recommendation 4", "Use many pre-training iterations: longer pre-training on "
            "the selected set gives a better student.", "pretrain_epochs"),
    Finding("rec5-balanced", "recommendation 5", "Build a balanced distribution for inferred labels: top-K per "
            "class beats keeping every confident image (unbalanced).", "selection_policy"),
    Finding("rec6-weak-teacher", "recommendation 6", "Pre-training the teacher by weak supervision (tags) "
            "further improves the student.", "weak_pretrain_epochs"),
    Finding("k-optimum", "paper, effect of K", "Accuracy first rises with K, then falls as more noisy labels "
            "enter: the best K is intermediate (the paper scaled K with the pool).", "k"),
    Finding("p-several", "paper, effect of P (P = 10 used)", "Letting each image enter several classes' rankings "
            "(P > 1) beats P = 1.", "p"),
    Finding("ranking-vs-random", "implied by the method", "Ranking by the teacher's score beats drawing the same "
            "number of images per class at random among the teacher's top-1.", "selection_policy"),
    Finding("noisy-student-selection", "Noisy Student (Xie et al. 2020)", "Confidence threshold then balancing "
            "(Noisy Student's selection) does about as well as top-K.", "selection_policy"),
    # Noisy Student's student is not fine-tuned afterwards: its claims are read before fine-tuning
    Finding("ns-soft-labels", "Noisy Student (Xie et al. 2020)", "Soft pseudo-labels (the teacher's softmax over "
            "every class) train a better student than hard ones (Noisy Student's student, not fine-tuned; this "
            "paper uses hard labels).", "soft_labels", "student_pretrained.top1"),
    Finding("ns-mixed-batches", "Noisy Student vs this paper", "Labeled images mixed into every pre-training batch "
            "train a better student (Noisy Student's, not fine-tuned; this paper keeps them apart and fine-tunes "
            "on them afterwards instead).", "pretrain_labeled_fraction", "student_pretrained.top1"),
    Finding("transfer", "paper, transfer to CUB-2011", "The semi-supervised student transfers to another task "
            "better than the supervised baseline and than training from scratch.", None),
)


def _t95(n: int) -> float:
    """The quantile for n - 1 degrees of freedom, or the next smaller tabled one (a wider interval)."""
    df = n - 1
    return _T95[max(k for k in _T95 if k <= df)] if df >= 1 else math.inf


def verdict(diff: dict, expect_positive: bool = True) -> str:
    """From a paired difference (mean, se, n): agrees, disagrees, or the direction within noise."""
    if diff["mean"] is None:
        return "not measured"
    if diff["n"] < 2 or not math.isfinite(diff["se"]):
        return "one seed only: no verdict"
    d = diff["mean"] if expect_positive else -diff["mean"]
    half = _t95(diff["n"]) * diff["se"]
    if d - half > 0:
        return "agrees"
    if d + half < 0:
        return "disagrees"
    if d == 0:
        return "no difference"
    return "same direction, within noise" if d > 0 else "opposite direction, within noise"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _pm(s: dict | None) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def _diff_text(diff: dict) -> str:
    if diff["mean"] is None:
        return "n/a"
    se = "" if diff["se"] is None or not math.isfinite(diff["se"]) else f" ± {100 * _t95(diff['n']) * diff['se']:.1f}"
    return f"{100 * diff['mean']:+.1f}{se} points (n={diff['n']})"


def _values(results: dict, study: str) -> dict[Any, dict]:
    return {_key(p["value"]): p for p in results["studies"].get(study, [])}


def _key(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _seeds(point: dict | None, metric: str) -> dict[int, float]:
    return {int(k): v for k, v in (point or {}).get("per_seed", {}).get(metric, {}).items()}


def _summary(point: dict | None, metric: str) -> dict | None:
    return (point or {}).get("summary", {}).get(metric)


def _compare(a: dict | None, b: dict | None, metric: str, a_name: str, b_name: str,
             b_metric: str | None = None) -> tuple[str, str]:
    if a is None or b is None:
        return "the grid has no such settings", "not measured"
    diff = paired_difference(_seeds(a, metric), _seeds(b, b_metric or metric))
    text = (f"{a_name} {_pm(_summary(a, metric))} vs {b_name} {_pm(_summary(b, b_metric or metric))} test top-1 %; "
            f"difference {_diff_text(diff)}")
    return text, verdict(diff)


def measure(finding: Finding, results: dict, grid: dict) -> tuple[str, str]:
    """(our measurement as text, verdict) for one finding."""
    base = results["base"]
    student_arch = grid["base"].get("student_arch", "cnn_small")
    if finding.id == "semi-supervised":
        return _compare(base, base, "student.top1", "student", "baseline", "baseline.top1")
    if finding.id == "rec2-fine-tune":
        return _compare(base, base, "student.top1", "fine-tuned", "not fine-tuned", "student_pretrained.top1")
    if finding.id == "transfer":
        t = results["transfer"]
        if not t["per_seed"]:
            if t.get("errors"):
                return f"the transfer failed: {t['errors'][0]}", "not measured"
            return "no transfer run in this grid", "not measured"
        parts, verdicts = [], []
        for other in ("baseline", "scratch"):
            diff = paired_difference(t["per_seed"].get("student", {}), t["per_seed"].get(other, {}))
            parts.append(f"vs from {other} {_pm(t['summary'].get(other))}: {_diff_text(diff)}")
            verdicts.append(verdict(diff))
        text = f"on {t['target']}: from the student {_pm(t['summary'].get('student'))} top-1 %; " + "; ".join(parts)
        return text, verdicts[0] if verdicts[0] == verdicts[1] else " / ".join(verdicts)
    values = _values(results, finding.study or "")
    if not values:
        return f"the grid has no {finding.study} study", "not measured"
    if finding.id == "rec1-self-training":
        same = values.get(student_arch)
        return _compare(same, same, "student.top1", f"self-trained ({student_arch} teacher)", "baseline",
                        "baseline.top1")
    if finding.id == "rec1-teacher-capacity":
        largest = max(values, key=_capacity)
        return _compare(values.get(largest), values.get(student_arch), "student.top1", f"{largest} teacher",
                        f"{student_arch} teacher (self-training)")
    if finding.id in ("rec3-pool-size", "rec4-pretrain-length", "rec6-weak-teacher", "ns-soft-labels",
                      "ns-mixed-batches"):
        ordered = sorted(values)
        high, low = values[ordered[-1]], values[ordered[0]]
        text, v = _compare(high, low, finding.metric, f"{finding.study}={ordered[-1]}", f"{finding.study}={ordered[0]}")
        if finding.metric == "student_pretrained.top1":  # what this paper's fine-tuning then makes of it
            after = paired_difference(_seeds(high, "student.top1"), _seeds(low, "student.top1"))
            text = f"before fine-tuning: {text}; after fine-tuning: difference {_diff_text(after)}"
        return text, v
    if finding.id == "p-several":
        ordered = sorted(values)
        return _compare(values[ordered[-1]], values.get(1), finding.metric, f"P={ordered[-1]}", "P=1")
    if finding.id == "rec5-balanced":
        return _compare(values.get("topk"), values.get("threshold"), finding.metric, "top-K", "threshold only")
    if finding.id == "ranking-vs-random":
        return _compare(values.get("topk"), values.get("random"), finding.metric, "top-K", "random")
    if finding.id == "noisy-student-selection":
        text, v = _compare(values.get("noisy_student"), values.get("topk"), finding.metric, "noisy_student", "top-K")
        if v in ("agrees", "disagrees"):  # the claim is "about as well": any clear difference is a disagreement
            return text, "disagrees"
        # no test of equivalence: with few seeds "no clear difference" is all this can say
        return text, "no clear difference (within noise)" if "within noise" in v or v == "no difference" else v
    if finding.id == "k-optimum":
        return _k_optimum(values, finding.metric)
    raise ValueError(f"no measurement for finding {finding.id}")


def _k_optimum(values: dict, metric: str) -> tuple[str, str]:
    ordered = sorted(values)
    means = {k: (_summary(values[k], metric) or {}).get("mean") for k in ordered}
    if len(ordered) < 3 or any(m is None for m in means.values()):
        return "needs at least three K values with results", "not measured"
    best = max(ordered, key=lambda k: means[k])
    text = "; ".join(f"K={k}: {_pm(_summary(values[k], metric))}" for k in ordered)
    if min(len(_seeds(values[k], metric)) for k in ordered) < 2:
        return text, "one seed only: no verdict"
    if best in (ordered[0], ordered[-1]):
        # an end beats every K inside the range, significantly or not
        inner = [verdict(paired_difference(_seeds(values[best], metric), _seeds(values[k], metric)))
                 for k in ordered[1:-1]]
        where = "smallest" if best == ordered[0] else "largest"
        return f"{text} (best at the {where} K)", \
            "disagrees" if all(v == "agrees" for v in inner) else "opposite direction, within noise"
    lower = [verdict(paired_difference(_seeds(values[best], metric), _seeds(values[k], metric)))
             for k in (ordered[0], ordered[-1])]
    text += f" (best K={best})"
    return text, "agrees" if all(v == "agrees" for v in lower) else "same direction, within noise"


def _capacity(arch: Any) -> int:
    """Parameters of an architecture (for 10 classes of 28x28 grayscale): how the largest teacher is found."""
    from .models import build_model

    try:
        return sum(p.numel() for p in build_model(str(arch), 1, 10, (28, 28)).parameters())
    except Exception:  # not an architecture name: keep the study's order
        return -1


def render(results: dict, plots: list[str], notes: dict[str, str] | None = None) -> str:
    """The whole ``REPRODUCTION.md``: findings table, per-study tables, the plots, how it was run."""
    grid, notes = results["grid"], notes or {}
    seeds = results["seeds"]
    lines = [
        "# Reproducing the paper's findings in miniature",
        "",
        f"Generated by `semisup experiments` from experiment `{results['experiment']}` on dataset "
        f"`{grid['dataset']}`, {len(seeds)} seeds ({', '.join(map(str, seeds))}). Every number is the test top-1 "
        "accuracy in percent, mean ± sample standard deviation over seeds; a difference is paired by seed and "
        "given with its 95% t-interval half-width. A verdict *agrees* when that interval lies above zero.",
        "",
        "## Findings",
        "",
        "| Finding | Source | Claim | Our measurement | Verdict | Why, where it does not agree |",
        "|---|---|---|---|---|---|",
    ]
    for f in FINDINGS:
        text, v = measure(f, results, grid)
        lines.append(f"| {f.id} | {f.source} | {f.claim} | {text} | **{v}** | {notes.get(f.id, '')} |")
    lines += ["", "## Data", "", _data_text(results), "", "## Studies", "",
              f"Base setting: `{_setting_text(grid['base'])}`; each study changes one knob. Oracle (the student "
              f"recipe on the pool's true labels, base setting): {_pm(results['oracle'])}.", ""]
    for study, points in results["studies"].items():
        lines += [f"### {study}", ""]
        if f"study-{study}" in plots:
            lines += [f"![{study}](plots/study-{study}.png)", ""]
        lines += ["| value | student | before fine-tuning | teacher | baseline | tail recall (student) | "
                  "pseudo-label precision | selected pairs |", "|---|---|---|---|---|---|---|---|"]
        for p in points:
            s = p["summary"]
            err = f" ({len(p['errors'])} failed: {p['errors'][0]})" if p["errors"] else ""
            pairs = s.get("selection.selected_pairs", {}).get("mean")
            cols = [_pm(s.get(m)) for m in ("student.top1", "student_pretrained.top1", "teacher.top1", "baseline.top1",
                                             "student.tail_recall", "selection.pseudo_label_precision")]
            cols.append("n/a" if pairs is None else str(round(pairs)))
            lines.append(f"| {p['value']}{err} | " + " | ".join(cols) + " |")
        lines.append("")
    t = results["transfer"]
    if t["per_seed"]:
        lines += ["### transfer", "", f"Fine-tuned on `{t['target']}` (another task) from each starting point:", ""]
        if "transfer" in plots:
            lines += ["![transfer](plots/transfer.png)", ""]
        lines += ["| start | top-1 |", "|---|---|"]
        lines += [f"| {k} | {_pm(v)} |" for k, v in t["summary"].items()] + [""]
    lines += ["## How it ran", "",
              f"Cells (setting × seed) took {results['cell_seconds'] / 60:.1f} min and the shared teachers, "
              f"baselines and oracles {results['shared_seconds'] / 60:.1f} min of stage time.",
              f"Failed cells: {len(results['errors'])}.", ""]
    return "\n".join(lines)


def _data_text(results: dict) -> str:
    grid, data = results["grid"], results.get("data") or {}
    parts = [f"Labeled dataset `{grid['dataset']}` version {results.get('dataset_version') or 'latest'}."]
    tags = data.get("weak_labels")
    if tags:
        right = tags.get("correct_fraction")
        parts.append(f"Weak labels: {tags['tagged']:,} of {tags['images']:,} pool images tagged"
                     + (f", {100 * right:.1f}% of the digits' tags right (measured against the truth)." if right
                        is not None else "."))
    if not data.get("truth", True):
        parts.append("The drops have no true labels: no oracle, no pseudo-label precision.")
    errors = results["transfer"].get("errors") or []
    if errors:
        parts.append(f"Transfer failed for {len(errors)} seed(s): {errors[0]}.")
    return " ".join(parts)


def _setting_text(setting: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items())


def study_plots(results: dict) -> dict[str, bytes]:
    """One PNG per study (student before/after fine-tuning, teacher, baseline and oracle bands) and transfer."""
    plots = {}
    for study, points in results["studies"].items():
        plots[f"study-{study}"] = _study_plot(study, points, results)
    if results["transfer"]["per_seed"]:
        plots["transfer"] = _transfer_plot(results["transfer"])
    return plots


def _figure(width: float = 7.5, height: float = 4.2) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _mean_std(points: list[dict], metric: str) -> tuple[list[float], list[float]]:
    means, stds = [], []
    for p in points:
        s = p["summary"].get(metric) or {}
        means.append(100 * s["mean"] if s.get("mean") is not None else math.nan)
        stds.append(100 * s["std"] if s.get("std") is not None else 0.0)
    return means, stds


def _study_plot(study: str, points: list[dict], results: dict) -> bytes:
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(len(points)))
    for metric, label, fmt in (("student.top1", "student", "o-"), ("student_pretrained.top1", "before fine-tuning",
                                                                   "s--"), ("teacher.top1", "teacher", "^:")):
        means, stds = _mean_std(points, metric)
        ax.errorbar(x, means, yerr=stds, fmt=fmt, capsize=4, label=label)
    base = results["base"]["summary"].get("baseline.top1") or {}
    if base.get("mean") is not None:
        m, s = 100 * base["mean"], 100 * base["std"]
        ax.axhline(m, color="grey", lw=1, label="baseline (labeled only)")
        ax.axhspan(m - s, m + s, color="grey", alpha=0.15)
    oracle = results.get("oracle") or {}
    if oracle.get("mean") is not None:
        ax.axhline(100 * oracle["mean"], color="green", lw=1, ls="--", label="oracle (true labels)")
    ax.set_xticks(x, [str(p["value"]) for p in points])
    ax.set_xlabel(study)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{study}: mean ± std over {len(results['seeds'])} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return figure_png(fig)


def _transfer_plot(transfer: dict) -> bytes:
    fig = _figure(5.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    names = list(transfer["summary"])
    means = [100 * (transfer["summary"][n]["mean"] or 0) for n in names]
    stds = [100 * (transfer["summary"][n]["std"] or 0) for n in names]
    ax.bar(names, means, yerr=stds, capsize=5, color=["#bbbbbb", "#8fb3d9", "#2e6fb0"][:len(names)])
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"transfer to {transfer['target']}")
    ax.grid(axis="y", alpha=0.3)
    return figure_png(fig)
