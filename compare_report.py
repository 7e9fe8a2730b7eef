"""What compare.py reports of its groups: the numbers compare.json holds (mean ± sample std per
group, a row per run), and what shows them: the per-group curve figures, the self-contained
compare.html and the terminal table."""

from __future__ import annotations

import html
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import report


@dataclass
class Run:
    path: Path
    args: dict
    results: dict
    curves: dict
    task: str
    epochs_trained: float | None
    name: str = ""
    group: str = ""


@dataclass
class Group:
    label: str
    recipe: dict
    differs: dict
    runs: list[Run]
    eval_only: bool = False


TITLES = {
    "test_accuracy": "test accuracy",
    "mean_per_class_accuracy": "mean per-class acc.",
    "test_loss": "test loss",
    "mean_ap": "mean AP",
    "mean_ap_softmax": "mean AP (softmax)",
    "miou": "mIoU",
    "pixel_accuracy": "pixel accuracy",
    "epochs": "epochs",
    "train_time_min": "train time (min)",
    "train_images_per_s": "train images/s",
    "train_tflop": "train TFLOP",
    "val_tflop": "validation TFLOP",
}
FORMATS = {
    "epochs": "{:.4g}",
    "train_time_min": "{:.2f}",
    "train_images_per_s": "{:,.0f}",
    "train_tflop": "{:,.2f}",
    "val_tflop": "{:,.2f}",
}
GROUPING = (
    "Runs form one group only when they are seeds of one recipe: their arguments differ only in "
    "seed and in flags that cannot change the result (output folder, device, threads, "
    "channels-last, micro-batch, ...), and they trained the same number of epochs under the same "
    "time limit and --stop-after-epochs. --eval-only folders form groups of their own. "
)


def format_value(value) -> str:
    """An argument's value in a label: compact JSON, floats by %g, '-' where it is unset."""
    if value is None:
        return "-"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return f"{value:g}" if isinstance(value, float) else str(value)


def canonical(value) -> str:
    """A value as comparable text: equal values, equal text (dict order aside)."""
    return json.dumps(value, sort_keys=True, default=str)


def fmt(name: str, value: float | None) -> str:
    return "–" if value is None else FORMATS.get(name, "{:.4f}").format(value)


def fmt_stats(name: str, stats: dict) -> str:
    std = "" if stats["std"] is None else f" ± {fmt(name, stats['std'])}"
    return fmt(name, stats["mean"]) + std


# ----------------------------------------------------------------------------- numbers
def number(value) -> float | None:
    """A finite float, or None for anything else (missing, empty, text, nan, bool)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def describe(values: list[float | None]) -> dict:
    """mean, sample std (ddof=1; None for a single value), n over the values that exist."""
    present = [v for v in values if v is not None]
    return {
        "mean": float(np.mean(present)) if present else None,
        "std": float(np.std(present, ddof=1)) if len(present) > 1 else None,
        "n": len(present),
        "values": values,
    }


def run_row(run: Run, spec: SimpleNamespace) -> dict:
    res, env = run.results, run.args.get("environment")
    env = env if isinstance(env, dict) else {}
    seconds = number(res.get("train_time_s"))
    metrics = {m: number(res.get(m)) for m in (spec.headline, *spec.extras, *spec.run_fields)}
    metrics |= {
        "epochs": run.epochs_trained,
        "train_time_min": None if seconds is None else seconds / 60,
    }
    per_class = res.get(spec.per_class)
    per_class = per_class if isinstance(per_class, dict) else {}
    device, world = str(env.get("gpu") or env.get("device") or ""), env.get("world_size") or 1
    return {
        "name": run.name,
        "path": str(run.path),
        "group": run.group,
        "seed": run.args.get("seed"),
        "device": f"{device} x{world}" if world != 1 else device,
        "headline": metrics[spec.headline],
        "metrics": metrics,
        "per_class": {str(k): number(v) for k, v in per_class.items()},
    }


def summarise(runs: list[Run], groups: list[Group], spec: SimpleNamespace) -> dict:
    """Everything compare.json holds (and the HTML shows)."""
    rows = {run.name: run_row(run, spec) for run in runs}
    classes = list(dict.fromkeys(c for row in rows.values() for c in row["per_class"]))
    for row in rows.values():
        row["per_class"] = {c: row["per_class"].get(c) for c in classes}
    return {
        "task": runs[0].task,
        "part": spec.part,
        "headline": spec.headline,
        "per_class_metric": spec.per_class,
        "classes": classes,
        "runs": list(rows.values()),
        "groups": [
            {
                "label": g.label,
                "n": len(g.runs),
                "runs": [r.name for r in g.runs],
                "seeds": [r.args.get("seed") for r in g.runs],
                "eval_only": g.eval_only,
                "differs": g.differs,
                "recipe": g.recipe,
                "metrics": {
                    m: describe([rows[r.name]["metrics"][m] for r in g.runs])
                    for m in (spec.headline, *spec.extras, *spec.run_fields)
                },
                "per_class": {
                    c: describe([rows[r.name]["per_class"][c] for r in g.runs]) for c in classes
                },
            }
            for g in groups
        ],
    }


# ----------------------------------------------------------------------------- figures
def group_curve(runs: list[Run], column: str) -> tuple[np.ndarray, ...] | None:
    """(epochs, mean, min, max) over the runs that logged ``column``, epoch by epoch (runs may
    stop at different epochs)."""
    by_epoch: dict[float, list[float]] = {}
    for curves in (run.curves for run in runs if column in run.curves):
        for epoch, value in zip(curves["epoch"], curves[column]):
            if np.isfinite(value):
                by_epoch.setdefault(epoch, []).append(value)
    if not by_epoch:
        return None
    epochs = sorted(by_epoch)
    stats = (np.array([f(by_epoch[e]) for e in epochs]) for f in (np.mean, np.min, np.max))
    return np.array(epochs), *stats


def plot_curves(groups: list[Group], quantity: str, ylabel: str, path: Path) -> bool:
    """Training (left) and validation (right) ``quantity`` per group; False without data."""
    columns = [f"train_{quantity}", f"val_{quantity}"]
    if not any(c in run.curves for c in columns for g in groups for run in g.runs):
        return False
    fig, axes = report._plt().subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, split, column in zip(axes, ("training", "validation"), columns):
        for k, group in enumerate(groups):
            if (curve := group_curve(group.runs, column)) is not None:
                epochs, mean, low, high = curve
                ax.plot(
                    epochs,
                    mean,
                    color=f"C{k % 10}",
                    label=f"{group.label} (n={len(group.runs)})",
                    marker="." if epochs.size < 3 else None,
                )
                ax.fill_between(epochs, low, high, color=f"C{k % 10}", alpha=0.2, lw=0)
        if ax.lines:
            ax.legend(fontsize="small")
        missing = "" if ax.lines else f" (no {column} in metrics.csv)"
        ax.set(title=f"{split} {ylabel}{missing}", xlabel="epoch")
        ax.xaxis.set_major_locator(report._plt().MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    report.save_figure(fig, path)
    return True


def contrast_labels(groups: list[dict]) -> list[str]:
    """Per group, the arguments in which it differs from the value most groups share (a legend
    of many groups reads better so than by the arguments that set all of them apart)."""
    common = {}
    for key in groups[0]["differs"] if groups else ():
        values = [canonical(g["differs"].get(key)) for g in groups]
        value, count = Counter(values).most_common(1)[0]  # ties: the first group's value
        common[key] = value if count > 1 else None  # no value shared: every group names it
    labels = []
    for g in groups:
        own = [f"{k}={format_value(v)}" for k, v in g["differs"].items()
               if canonical(v) != common.get(k)]  # fmt: skip
        label = " ".join(own) or "the recipe most groups share"
        labels.append(label if len(label) <= 70 else label[:69] + "…")
    return labels


def frontier_points(summary: dict, spec: SimpleNamespace) -> list[tuple]:
    """(label, mean TFLOP of training + validation, headline mean, its std or 0, n) for each
    group that recorded its compute; eval-only groups trained nothing and are left out."""
    points = []
    for g, label in zip(summary["groups"], contrast_labels(summary["groups"])):
        compute = [g["metrics"][m]["mean"] for m in spec.compute]
        headline = g["metrics"][spec.headline]
        if g["eval_only"] or not compute or None in compute or headline["mean"] is None:
            continue
        points.append((label, sum(compute), headline["mean"], headline["std"] or 0, g["n"]))
    return points


def plot_frontier(summary: dict, spec: SimpleNamespace, path: Path) -> bool:
    """The headline (mean ± sample std over seeds) against training + validation compute per
    group, on a log axis; False where no group recorded its compute."""
    points = frontier_points(summary, spec)
    if not points:
        return False
    fig, ax = report._plt().subplots(figsize=(8, 4.5))
    for k, (label, tflop, mean, std, n) in enumerate(points):
        ax.errorbar(tflop, mean, yerr=std, fmt="o", capsize=3, color=f"C{k % 10}",
                    label=f"{label} (n={n})")  # fmt: skip
    ax.set_xscale("log")
    for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
        axis(report._plt().ScalarFormatter())  # 100, 200, not 10^2, 2 x 10^2
    ax.set(xlabel="training + validation compute (TFLOP, log scale)",
           ylabel=f"test {TITLES[spec.headline]}", title="Compute against result")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="x-small", loc="lower right")
    report.save_figure(fig, path)
    return True


# ----------------------------------------------------------------------------- HTML
def group_tables(summary: dict, spec: SimpleNamespace) -> list[tuple[str, str, str]]:
    """(title, explanation, table) of the groups, their metrics and their per-class values."""
    groups, classes, headline = summary["groups"], summary["classes"], spec.headline
    table = report.html_table
    names = [headline, *spec.extras, *spec.run_fields]
    group_rows = [
        [
            g["label"],
            g["n"],
            ", ".join(map(str, g["seeds"])),
            ", ".join(
                f"{run} ({fmt(headline, value)})"
                for run, value in zip(g["runs"], g["metrics"][headline]["values"])
            ),
            " ".join(f"{k}={format_value(v)}" for k, v in g["differs"].items())
            or "(only one group)",
        ]
        for g in groups
    ]
    metric_rows = [
        [g["label"], g["n"], *(fmt_stats(m, g["metrics"][m]) for m in names)] for g in groups
    ]
    class_rows = [
        [c, *(fmt_stats(spec.per_class, g["per_class"][c]) for g in groups)] for c in classes
    ]
    return [
        (
            "Groups",
            GROUPING + f"Each run is listed with its {TITLES[headline]}; the last column lists "
            "what differs between groups.",
            table(
                ["group", "n", "seeds", f"runs ({TITLES[headline]})", "arguments that differ"],
                group_rows,
            ),
        ),
        (
            "Headline metrics per group",
            "Mean ± sample standard deviation (ddof=1) over the group's runs on the test set; n "
            "is the number of runs; a single run shows its value; – where no run recorded it.",
            table(["group", "n", *(TITLES[m] for m in names)], metric_rows),
        ),
        (
            f"{spec.per_class_title} per group",
            "A row per class, a column per group: mean ± sample std over the group's runs."
            if classes
            else "No run holds per-class values.",
            table(["class", *(f"{g['label']} (n={g['n']})" for g in groups)], class_rows)
            if classes
            else "",
        ),
    ]


def run_table(summary: dict, spec: SimpleNamespace) -> tuple[str, str, str]:
    classes, headline = summary["classes"], spec.headline
    header = ["run", "group", "seed", "device", TITLES[headline], *classes]
    rows = [
        [
            r["name"],
            r["group"],
            r["seed"],
            r["device"],
            fmt(headline, r["headline"]),
            *(fmt(spec.per_class, r["per_class"].get(c)) for c in classes),
            *(fmt(m, r["metrics"][m]) for m in spec.run_fields),
        ]
        for r in summary["runs"]
    ]
    return (
        "Per run",
        f"Each run folder with its {TITLES[headline]}, {spec.per_class_title.lower()}, "
        + ", ".join(TITLES[m] for m in spec.run_fields)
        + ".",
        report.html_table([*header, *(TITLES[m] for m in spec.run_fields)], rows),
    )


def render_html(summary: dict, spec: SimpleNamespace, out: Path) -> str:
    curves = "".join(
        report.figure_html(
            out,
            report.Figure(
                f"{q}_curves.png",
                f"{title.capitalize()} curves",
                f"Training (left) and validation (right) {title} per epoch.",
                wide=True,
            ),
            missing=f"No {q} columns in metrics.csv.",
        )
        for q, title in (("loss", "loss"), ("accuracy", spec.accuracy))
    )
    sections = [*group_tables(summary, spec)]
    if "frontier" in summary["figures"]:
        figure = report.Figure(
            "frontier.png",
            "Compute against result",
            "Each group's mean over its seeds (bars: sample std).",
            wide=True,
        )
        sections.append((
            "Compute against result",
            "What each recipe reached for the compute it spent training and validating.",
            f"<div class='figures'>{report.figure_html(out, figure)}</div>",
        ))  # fmt: skip
    sections += [
        (
            "Training curves",
            "Line: the mean over the group's runs; shaded band: their minimum to maximum.",
            f"<div class='figures'>{curves}</div>",
        ),
        run_table(summary, spec),
    ]
    intro = (
        f"{len(summary['runs'])} runs in {len(summary['groups'])} group(s); headline metric "
        f"{TITLES[spec.headline]}; created {summary['created']}."
    )
    return report.html_page(
        f"Run comparison, {spec.title}",
        [
            f"<p>{intro}</p>",
            *(
                f"<h2>{html.escape(title)}</h2><p class='why'>{html.escape(why)}</p>{content}"
                for title, why, content in sections
            ),
        ],
    )


def terminal_table(summary: dict, spec: SimpleNamespace) -> str:
    """The groups' headline metric and (where recorded) compute, as aligned columns."""
    groups = summary["groups"]
    compute = [m for m in spec.compute if any(g["metrics"][m]["n"] for g in groups)]
    names = [spec.headline, *compute]
    rows = [["group", "n", *names]]
    rows += [
        [g["label"], str(g["n"]), *(fmt_stats(m, g["metrics"][m]) for m in names)] for g in groups
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
