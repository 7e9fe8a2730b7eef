"""Compare finished run folders of part1_classify.py or part2_segment.py.

Runs whose arguments differ only in seed (and bookkeeping such as the output folder) are pooled
into one group.  Each group is reported as mean ± sample std over its runs, and its training
curves are drawn as the mean over its runs with a min-max band.  Writes compare.html
(self-contained), compare.json and the PNG figures into a fresh output folder.

    for seed in 0 1 2; do python part1_classify.py --seed $seed --output-dir runs/a/seed$seed; done
    python compare.py runs/a/seed*
"""
from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import os
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_OUTPUT_ROOT = Path("outputs") / "compare"
HTML_NAME, JSON_NAME = "compare.html", "compare.json"

# Arguments that do not change what is trained (bookkeeping, where and how fast it runs, when it
# stops on the wall clock): runs differing only in these are repeats of one recipe.  amp and
# channels_last stay in the recipe: they can change the numbers.
NON_RECIPE_ARGS = frozenset({
    "seed", "output_dir", "resume", "eval_only", "report_only", "device", "threads",
    "no_progress", "environment", "time_limit", "stop_after_epochs", "compile", "no_download",
    "eval_batch_size", "num_examples",
})
# Arguments named first in a group label, when they differ: the ones people tune most.
LABEL_FIRST = ("model", "lr", "epochs", "batch_size")
MAX_LABEL_CHARS = 48

CURVE_COLUMNS = ("train_loss", "val_loss", "train_accuracy", "val_accuracy")


@dataclass(frozen=True)
class TaskSpec:
    """What a part's results.json holds and how to present it."""
    part: int
    title: str
    headline: str               # the single number a run is ranked by
    per_class: str              # results.json key of the {class: value} dict
    per_class_title: str
    extras: tuple[str, ...]     # further scalar metrics worth a column
    accuracy_title: str         # what the accuracy columns of metrics.csv measure


TASKS = {
    "classification": TaskSpec(
        part=1, title="Part 1: Fashion-MNIST classification", headline="test_accuracy",
        per_class="per_class_accuracy", per_class_title="Per-class test accuracy",
        extras=("mean_per_class_accuracy", "test_loss"), accuracy_title="accuracy"),
    "segmentation": TaskSpec(
        part=2, title="Part 2: facade segmentation", headline="mean_ap",
        per_class="ap", per_class_title="Per-class average precision (AP)",
        extras=("mean_ap_softmax", "miou", "pixel_accuracy", "test_loss"),
        accuracy_title="pixel accuracy"),
}
RUN_FIELDS = ("epochs", "train_time_min", "train_images_per_s")
TITLES = {
    "test_accuracy": "test accuracy", "mean_per_class_accuracy": "mean per-class acc.",
    "test_loss": "test loss", "mean_ap": "mean AP", "mean_ap_softmax": "mean AP (softmax)",
    "miou": "mIoU", "pixel_accuracy": "pixel accuracy", "epochs": "epochs",
    "train_time_min": "train time (min)", "train_images_per_s": "train images/s",
}


class CompareError(Exception):
    """A problem with the user's input: reported as one 'error:' line, exit code 2."""


@dataclass
class Run:
    path: Path
    args: dict[str, Any]
    results: dict[str, Any]
    curves: dict[str, np.ndarray]
    task: str
    name: str = ""
    group: str = ""


@dataclass
class Group:
    label: str
    recipe: dict[str, Any]
    differs: dict[str, Any]
    runs: list[Run]


# ----------------------------------------------------------------------------- reading
def number(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, empty, text, nan, bool)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CompareError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CompareError(f"{path} does not hold a JSON object")
    return data


def read_curves(path: Path) -> dict[str, np.ndarray]:
    """metrics.csv as float arrays sorted by epoch ("epoch" plus whichever CURVE_COLUMNS hold
    numbers).  A missing file or column just gives fewer keys: curves are optional."""
    if not path.is_file():
        return {}
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = [c for c in CURVE_COLUMNS if c in (reader.fieldnames or [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CompareError(f"cannot read {path}: {exc}") from None
    by_epoch: dict[float, dict[str, str]] = {}
    for row in rows:
        epoch = number(row.get("epoch"))
        if epoch is not None:
            by_epoch[epoch] = row  # a resumed run logs an epoch again: the last row wins
    epochs = sorted(by_epoch)
    if not epochs:
        return {}
    curves = {"epoch": np.array(epochs, dtype=float)}
    for column in columns:
        values = [number(by_epoch[e].get(column)) for e in epochs]
        array = np.array([np.nan if v is None else v for v in values], dtype=float)
        if np.isfinite(array).any():
            curves[column] = array
    return curves


def detect_task(path: Path, args: dict[str, Any], results: dict[str, Any]) -> str:
    """The task named in results.json (or args.json), else told apart by the headline key."""
    named = results.get("task", args.get("task"))
    if named is not None:
        if named not in TASKS:
            raise CompareError(f"{path}: unknown task {named!r} (known: {', '.join(TASKS)})")
        return str(named)
    for task, spec in TASKS.items():
        if spec.headline in results:
            return task
    raise CompareError(f"cannot tell whether {path} is a Part 1 or a Part 2 run: its "
                       "results.json has neither test_accuracy nor mean_ap")


def load_run(path: Path) -> Run:
    if not path.exists():
        raise CompareError(f"run folder not found: {path}")
    if not path.is_dir():
        raise CompareError(f"not a folder: {path}")
    if not (path / "results.json").is_file():
        raise CompareError(f"{path} is unfinished (no results.json): let the run finish, or "
                           "resume it, before comparing")
    if not (path / "args.json").is_file():
        raise CompareError(f"{path} has no args.json: not a run folder of part1_classify.py "
                           "or part2_segment.py?")
    args = read_json_object(path / "args.json")
    results = read_json_object(path / "results.json")
    task = detect_task(path, args, results)
    return Run(path=path, args=args, results=results, curves=read_curves(path / "metrics.csv"),
               task=task)


def load_runs(paths: Sequence[Path]) -> list[Run]:
    seen: dict[Path, Path] = {}
    for path in paths:
        key = path.resolve()
        if key in seen:
            raise CompareError(f"run folder given twice: {seen[key]} and {path}")
        seen[key] = path
    runs = [load_run(path) for path in paths]
    tasks = {run.task for run in runs}
    if len(tasks) > 1:
        listing = ", ".join(f"{run.path} (Part {TASKS[run.task].part})" for run in runs)
        raise CompareError(f"cannot compare Part 1 and Part 2 runs together: {listing}")
    for run, name in zip(runs, unique_names([run.path for run in runs])):
        run.name = name
    return runs


def unique_names(paths: Sequence[Path]) -> list[str]:
    """The shortest trailing path parts that tell the folders apart (seed0, or a/seed0 when
    two recipes both have a seed0)."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


# ----------------------------------------------------------------------------- grouping
def recipe_of(args: dict[str, Any]) -> dict[str, Any]:
    """The arguments that define what is trained.  None values are dropped, so that an older
    folder lacking a newer (unset) argument still groups with newer folders."""
    recipe = {k: v for k, v in args.items() if k not in NON_RECIPE_ARGS and v is not None}
    # Processes multiply the global batch (batch_size is per process), so they change the recipe.
    environment = args.get("environment") if isinstance(args.get("environment"), dict) else {}
    recipe.setdefault("world_size", environment.get("world_size") or 1)
    return recipe


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value)


def differing_keys(recipes: Sequence[dict[str, Any]]) -> list[str]:
    """Recipe keys whose value is not the same in every group, the LABEL_FIRST ones first."""
    union = list(dict.fromkeys(k for recipe in recipes for k in recipe))
    ordered = [k for k in LABEL_FIRST if k in union] + [k for k in union if k not in LABEL_FIRST]
    return [k for k in ordered if len({canonical(r.get(k)) for r in recipes}) > 1]


def short_label(recipe: dict[str, Any], keys: Sequence[str]) -> str:
    """'model=unet lr=0.002', cut to MAX_LABEL_CHARS with '+N more' for the rest."""
    parts = [f"{k}={format_value(recipe.get(k))}" for k in keys]
    label = parts[0]
    for used, part in enumerate(parts[1:], start=1):
        rest = len(parts) - used - 1
        if len(f"{label} {part}") + (len(f" +{rest} more") if rest else 0) > MAX_LABEL_CHARS:
            return f"{label} +{len(parts) - used} more"
        label = f"{label} {part}"
    return label


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Groups in order of first appearance, labelled by the arguments that set them apart."""
    members: dict[str, list[Run]] = {}
    for run in runs:
        members.setdefault(canonical(recipe_of(run.args)), []).append(run)
    recipes = [recipe_of(group[0].args) for group in members.values()]
    keys = differing_keys(recipes)
    groups = []
    for recipe, group in zip(recipes, members.values()):
        if keys:
            label = short_label(recipe, keys)
        else:
            label = format_value(recipe.get("model", "all runs"))
        groups.append(Group(label=label, recipe=recipe, runs=group,
                            differs={k: recipe.get(k) for k in keys}))
    make_labels_unique(groups)
    for group in groups:
        for run in group.runs:
            run.group = group.label
    return groups


def make_labels_unique(groups: Sequence[Group]) -> None:
    """Cut labels (or values that print alike) can collide: number the repeats."""
    counts: dict[str, int] = {}
    for group in groups:
        counts[group.label] = counts.get(group.label, 0) + 1
    seen: dict[str, int] = {}
    for group in groups:
        if counts[group.label] > 1:
            seen[group.label] = seen.get(group.label, 0) + 1
            group.label = f"{group.label} #{seen[group.label]}"


# ----------------------------------------------------------------------------- numbers
def run_metrics(run: Run, spec: TaskSpec) -> dict[str, float | None]:
    results = run.results
    metrics = {name: number(results.get(name)) for name in (spec.headline, *spec.extras)}
    epochs = number(results.get("epochs_trained"))
    if epochs is None and "epoch" in run.curves:
        epochs = float(run.curves["epoch"][-1])
    seconds = number(results.get("train_time_s"))
    metrics["epochs"] = epochs
    metrics["train_time_min"] = None if seconds is None else seconds / 60
    metrics["train_images_per_s"] = number(results.get("train_images_per_s"))
    return metrics


def run_per_class(run: Run, spec: TaskSpec) -> dict[str, float | None]:
    values = run.results.get(spec.per_class)
    return {str(k): number(v) for k, v in values.items()} if isinstance(values, dict) else {}


def describe(values: Sequence[float | None]) -> dict[str, Any]:
    """mean, sample std (ddof=1; None for a single value), n over the values that exist."""
    present = np.array([v for v in values if v is not None], dtype=float)
    n = int(present.size)
    return {
        "mean": float(np.mean(present)) if n else None,
        "std": float(np.std(present, ddof=1)) if n > 1 else None,
        "n": n,
        "values": list(values),
    }


def device_of(run: Run) -> str:
    environment = run.args.get("environment")
    if not isinstance(environment, dict):
        return ""
    device = str(environment.get("gpu") or environment.get("device") or "")
    world = environment.get("world_size") or 1
    return f"{device} x{world}" if world != 1 else device


def summarise(runs: Sequence[Run], groups: Sequence[Group], spec: TaskSpec) -> dict[str, Any]:
    """Everything compare.json holds (and the HTML shows)."""
    classes = list(dict.fromkeys(c for run in runs for c in run_per_class(run, spec)))
    metric_names = [spec.headline, *spec.extras, *RUN_FIELDS]
    run_rows = []
    for run in runs:
        metrics, per_class = run_metrics(run, spec), run_per_class(run, spec)
        run_rows.append({
            "name": run.name, "path": str(run.path), "group": run.group,
            "seed": run.args.get("seed"), "device": device_of(run),
            "headline": metrics[spec.headline], "metrics": metrics,
            "per_class": {c: per_class.get(c) for c in classes},
        })
    by_name = {row["name"]: row for row in run_rows}
    group_rows = []
    for group in groups:
        rows = [by_name[run.name] for run in group.runs]
        group_rows.append({
            "label": group.label, "n": len(rows), "runs": [r["name"] for r in rows],
            "seeds": [r["seed"] for r in rows], "differs": group.differs,
            "recipe": group.recipe,
            "metrics": {m: describe([r["metrics"][m] for r in rows]) for m in metric_names},
            "per_class": {c: describe([r["per_class"][c] for r in rows]) for c in classes},
        })
    return {
        "task": runs[0].task, "part": spec.part, "headline": spec.headline,
        "per_class_metric": spec.per_class, "classes": classes,
        "runs": run_rows, "groups": group_rows,
    }


# ----------------------------------------------------------------------------- figures
def group_curve(runs: Sequence[Run], column: str) -> tuple[np.ndarray, ...] | None:
    """(epochs, mean, min, max) over the runs that logged `column`, aligned on epoch number
    (runs may stop at different epochs)."""
    logged = [run.curves for run in runs if column in run.curves]
    if not logged:
        return None
    epochs = np.unique(np.concatenate([curves["epoch"] for curves in logged]))
    matrix = np.full((len(logged), epochs.size), np.nan)
    for row, curves in zip(matrix, logged):
        row[np.searchsorted(epochs, curves["epoch"])] = curves[column]
    keep = np.isfinite(matrix).any(axis=0)  # all-nan epochs would make nanmean warn
    matrix, epochs = matrix[:, keep], epochs[keep]
    return epochs, np.nanmean(matrix, 0), np.nanmin(matrix, 0), np.nanmax(matrix, 0)


def plot_curves(groups: Sequence[Group], quantity: str, ylabel: str) -> bytes | None:
    """PNG of train (left) and validation (right) `quantity` per group; None without data."""
    columns = (("training", f"train_{quantity}"), ("validation", f"val_{quantity}"))
    runs = [run for group in groups for run in group.runs]
    if not any(column in run.curves for _, column in columns for run in runs):
        return None
    import matplotlib  # imported here: error paths and imports of compare stay fast
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    try:
        for ax, (split, column) in zip(axes, columns):
            draw_panel(ax, groups, column)
            ax.set_title(f"{split} {ylabel}")
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(ylabel)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buffer.getvalue()


def draw_panel(ax: Any, groups: Sequence[Group], column: str) -> None:
    drawn = False
    for index, group in enumerate(groups):
        curve = group_curve(group.runs, column)
        if curve is None:
            continue
        epochs, mean, low, high = curve
        color = f"C{index % 10}"
        ax.plot(epochs, mean, color=color, marker="." if epochs.size < 3 else None,
                label=f"{group.label} (n={len(group.runs)})")
        ax.fill_between(epochs, low, high, color=color, alpha=0.2, linewidth=0)
        drawn = True
    if drawn:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, f"no {column} in metrics.csv", ha="center", va="center",
                transform=ax.transAxes)


# ----------------------------------------------------------------------------- HTML
def fmt(name: str, value: float | None) -> str:
    if value is None:
        return "–"
    if name == "epochs":
        return f"{value:.4g}"
    if name == "train_time_min":
        return f"{value:.2f}"
    if name == "train_images_per_s":
        return f"{value:,.0f}"
    return f"{value:.4f}"


def fmt_stats(name: str, stats: dict[str, Any]) -> str:
    if stats["mean"] is None:
        return "–"
    if stats["std"] is None:
        return fmt(name, stats["mean"])
    return f"{fmt(name, stats['mean'])} ± {fmt(name, stats['std'])}"


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def section(title: str, explanation: str, content: str) -> str:
    return f"<h2>{html.escape(title)}</h2>\n<p>{html.escape(explanation)}</p>\n{content}\n"


def groups_section(summary: dict[str, Any]) -> str:
    rows = []
    for group in summary["groups"]:
        differs = " ".join(f"{k}={format_value(v)}" for k, v in group["differs"].items())
        rows.append([group["label"], str(group["n"]), ", ".join(map(str, group["seeds"])),
                     ", ".join(group["runs"]), differs or "(only one group)"])
    return section("Groups", "Runs whose arguments differ only in seed (and bookkeeping such as "
                   "the output folder or device) form one group; the last column lists every "
                   "argument that differs between groups.",
                   html_table(["group", "n", "seeds", "runs", "arguments that differ"], rows))


def group_metrics_section(summary: dict[str, Any], spec: TaskSpec) -> str:
    names = [spec.headline, *spec.extras, *RUN_FIELDS]
    rows = [[g["label"], str(g["n"]), *(fmt_stats(m, g["metrics"][m]) for m in names)]
            for g in summary["groups"]]
    return section("Headline metrics per group",
                   "Mean ± sample standard deviation (ddof=1) over the group's runs on the test "
                   "set; n is the number of runs, and a single run shows just its value.",
                   html_table(["group", "n", *(TITLES.get(m, m) for m in names)], rows))


def per_class_section(summary: dict[str, Any], spec: TaskSpec) -> str:
    if not summary["classes"]:
        return section(spec.per_class_title, "No run holds per-class values.", "")
    groups = summary["groups"]
    rows = [[c, *(fmt_stats(spec.per_class, g["per_class"][c]) for g in groups)]
            for c in summary["classes"]]
    return section(f"{spec.per_class_title} per group",
                   "One row per class, one column per group: mean ± sample std over the "
                   "group's runs, which shows the classes where recipes really differ.",
                   html_table(["class", *(f"{g['label']} (n={g['n']})" for g in groups)], rows))


def figure_section(title: str, explanation: str, png: bytes | None, missing: str) -> str:
    if png is None:
        return section(title, missing, "")
    data = base64.b64encode(png).decode("ascii")
    return section(title, explanation,
                   f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">')


def runs_section(summary: dict[str, Any], spec: TaskSpec) -> str:
    classes = summary["classes"]
    rows = []
    for run in summary["runs"]:
        metrics = run["metrics"]
        rows.append([run["name"], run["group"], str(run["seed"]), run["device"],
                     fmt(spec.headline, run["headline"]),
                     *(fmt(spec.per_class, run["per_class"][c]) for c in classes),
                     *(fmt(m, metrics[m]) for m in RUN_FIELDS)])
    header = ["run", "group", "seed", "device", TITLES[spec.headline], *classes,
              *(TITLES[m] for m in RUN_FIELDS)]
    return section("Per run", f"Each run folder with its {TITLES[spec.headline]}, "
                   f"{spec.per_class_title.lower()}, epochs trained, wall-clock training time "
                   "and training throughput.", html_table(header, rows))


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;margin-bottom:1em;font-size:0.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f0f0f0}
img{max-width:100%}p{color:#444}"""


def render_html(summary: dict[str, Any], spec: TaskSpec,
                figures: dict[str, bytes | None]) -> str:
    band = "line = mean over the group's runs, shaded band = min to max across them."
    body = "".join([
        groups_section(summary),
        group_metrics_section(summary, spec),
        per_class_section(summary, spec),
        figure_section("Loss curves", f"Training (left) and validation (right) loss per "
                       f"epoch; {band}", figures["loss"], "No loss columns in metrics.csv."),
        figure_section(f"{spec.accuracy_title.capitalize()} curves",
                       f"Training (left) and validation (right) {spec.accuracy_title} per "
                       f"epoch; {band}", figures["accuracy"],
                       "No accuracy columns in metrics.csv."),
        runs_section(summary, spec),
    ])
    n_runs, n_groups = len(summary["runs"]), len(summary["groups"])
    title = f"Run comparison, {spec.title}"
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
            f"<h1>{html.escape(title)}</h1>\n<p>{n_runs} runs in {n_groups} group(s); headline "
            f"metric {html.escape(TITLES[spec.headline])}; created "
            f"{html.escape(summary['created'])}.</p>\n{body}</body></html>\n")


# ----------------------------------------------------------------------------- writing
def write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file in the same folder and os.replace it into place, so that
    nobody (nor a crash) ever leaves a half-written file under the final name."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_dir(requested: Path | None) -> None:
    """Refuse, before anything is written, an --output-dir that would be overwritten."""
    if requested is None:
        return
    if requested.exists() and not requested.is_dir():
        raise CompareError(f"--output-dir {requested} exists and is not a folder")
    if (requested / HTML_NAME).exists():
        raise CompareError(f"--output-dir {requested} already holds {HTML_NAME}; "
                           "choose another folder")


def make_output_dir(requested: Path | None, now: datetime) -> Path:
    """The requested folder, or a new outputs/compare/<timestamp>[-k] that never reuses one."""
    if requested is not None:
        requested.mkdir(parents=True, exist_ok=True)
        return requested
    base = DEFAULT_OUTPUT_ROOT / now.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 1000):
        candidate = base if attempt == 1 else base.with_name(f"{base.name}-{attempt}")
        try:
            candidate.mkdir(parents=True, exist_ok=False)  # atomic: two compares cannot share
            return candidate
        except FileExistsError:
            continue
    raise CompareError(f"cannot find a free output folder next to {base}")


def jsonable(value: Any) -> Any:
    """nan/inf become null so that compare.json is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def compare_runs(run_dirs: Sequence[str | Path], output_dir: str | Path | None = None,
                 ) -> dict[str, Any]:
    """Compare the run folders, write the report into output_dir (default: a new
    outputs/compare/<timestamp>), and return what compare.json holds.  Raises CompareError,
    before writing anything, for input that cannot be compared."""
    if not run_dirs:
        raise CompareError("no run folders given")
    requested = None if output_dir is None else Path(output_dir)
    runs = load_runs([Path(d) for d in run_dirs])
    check_output_dir(requested)
    spec = TASKS[runs[0].task]
    groups = group_runs(runs)
    now = datetime.now()
    summary = summarise(runs, groups, spec)
    summary["created"] = now.isoformat(timespec="seconds")
    figures = {"loss": plot_curves(groups, "loss", "loss"),
               "accuracy": plot_curves(groups, "accuracy", spec.accuracy_title)}
    out = make_output_dir(requested, now)
    summary["output_dir"] = str(out)
    summary["figures"] = {}
    for quantity, png in figures.items():
        if png is not None:
            write_atomic(out / f"{quantity}_curves.png", png)
            summary["figures"][quantity] = f"{quantity}_curves.png"
    summary["html"] = str(out / HTML_NAME)
    text = json.dumps(jsonable(summary), indent=2, allow_nan=False, default=str) + "\n"
    write_atomic(out / JSON_NAME, text.encode("utf-8"))
    # compare.html last: its presence marks a complete report (and blocks reuse of the folder)
    write_atomic(out / HTML_NAME, render_html(summary, spec, figures).encode("utf-8"))
    return summary


# ----------------------------------------------------------------------------- CLI
def text_table(summary: dict[str, Any]) -> str:
    headline = summary["headline"]
    rows = [(g["label"], str(g["n"]), fmt_stats(headline, g["metrics"][headline]))
            for g in summary["groups"]]
    header = ("group", "n", headline)
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(2)]
    return "\n".join(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c}" for a, b, c in (header, *rows))


def build_parser() -> argparse.ArgumentParser:
    ignored = textwrap.fill("arguments ignored when grouping: "
                            + ", ".join(sorted(NON_RECIPE_ARGS)), width=79)
    parser = argparse.ArgumentParser(
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Compare finished run folders of part1_classify.py or of part2_segment.py (not\n"
            "both at once). Runs whose args.json differ only in seed and bookkeeping are\n"
            "pooled into a group, reported as mean ± sample std (ddof=1) of the headline\n"
            "metric (test_accuracy, or mean_ap for Part 2), per-class values, epochs, train\n"
            "time and throughput, with mean/min-max training curves. Writes compare.html\n"
            "(self-contained), compare.json and the curve PNGs."),
        epilog=(
            f"{ignored}\n"
            "(the number of processes, environment.world_size, does count).\n\n"
            "example:\n"
            "  for seed in 0 1 2; do\n"
            "    python part1_classify.py --seed $seed --output-dir runs/sigmoid/seed$seed\n"
            "  done\n"
            "  python compare.py runs/sigmoid/seed*"))
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run folders, each holding args.json, metrics.csv and results.json "
                             "(a run without results.json is unfinished and refused)")
    parser.add_argument("--output-dir", type=Path, default=None, metavar="DIR",
                        help="where to write the report (created if missing; refused if it "
                             f"already holds {HTML_NAME}). Default: a new "
                             f"{DEFAULT_OUTPUT_ROOT}/<YYYYmmdd-HHMMSS> folder, with -2, -3, ... "
                             "appended rather than reusing one")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = compare_runs(args.runs, args.output_dir)
    except (CompareError, OSError) as exc:
        message = " ".join(str(exc).split())  # exactly one line, whatever the cause
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    print(text_table(summary))
    print(f"report: {summary['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
