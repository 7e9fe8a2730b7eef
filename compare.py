"""Compare finished run folders of part1_classify.py or of part2_segment.py (not both at once).

Runs whose args.json differ only in seed and bookkeeping (the output folder, the device, ...) are
pooled into a group, reported as mean ± sample std (ddof=1) of the headline metric (test_accuracy,
or mean_ap for Part 2), the per-class values, epochs, training time and throughput, with the
training curves as the mean over the group's runs and a min-max band. Writes compare.html
(self-contained), compare.json and the curve PNGs into a new output folder.

    for seed in 0 1 2; do python part1_classify.py --seed $seed --output-dir runs/a/seed$seed; done
    python compare.py runs/a/seed*
"""

from __future__ import annotations

import csv
import html
import json
import math
import textwrap
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import cli
import report
import runfiles
import utils

OUTPUT_ROOT = Path("outputs") / "compare"
# Arguments that do not change what is trained: the seed, the recorded environment and the flags
# a resumed run may change (bookkeeping, where and how fast it runs, when it stops). Runs that
# differ only in these are repeats of one recipe. epochs, channels_last, micro_batch and tta stay
# in the recipe, as does amp: they can change the numbers.
NON_RECIPE_ARGS = frozenset(
    (cli.RESUME_FREE - {"epochs", "channels_last", "micro_batch", "tta"}) | {"seed", "environment"}
)
LABEL_FIRST = ("model", "lr", "epochs", "batch_size")  # named first in a label when they differ
MAX_LABEL_CHARS = 48
CURVE_COLUMNS = ("train_loss", "val_loss", "train_accuracy", "val_accuracy")
RUN_FIELDS = ("epochs", "train_time_min", "train_images_per_s")
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
}


# per part: the number runs are ranked by (headline), results.json's {class: value} key
# (per_class), further metrics worth a column (extras), what metrics.csv's accuracy measures
TASKS = {
    "classification": SimpleNamespace(
        part=1,
        title="Part 1: Fashion-MNIST classification",
        headline="test_accuracy",
        per_class="per_class_accuracy",
        per_class_title="Per-class test accuracy",
        extras=("mean_per_class_accuracy", "test_loss"),
        accuracy="accuracy",
    ),
    "segmentation": SimpleNamespace(
        part=2,
        title="Part 2: facade segmentation",
        headline="mean_ap",
        per_class="ap",
        per_class_title="Per-class average precision",
        accuracy="pixel accuracy",
        extras=("mean_ap_softmax", "miou", "pixel_accuracy", "test_loss"),
    ),
}


@dataclass
class Run:
    path: Path
    args: dict
    results: dict
    curves: dict
    task: str
    name: str = ""
    group: str = ""


@dataclass
class Group:
    label: str
    recipe: dict
    differs: dict
    runs: list[Run]


# ----------------------------------------------------------------------------- reading
def number(value) -> float | None:
    """A finite float, or None for anything else (missing, empty, text, nan, bool)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def read_curves(path: Path) -> dict[str, np.ndarray]:
    """metrics.csv as float arrays by epoch: "epoch" and those CURVE_COLUMNS that hold numbers
    (a resumed run logs an epoch again: the last row wins). No file: no curves."""
    try:
        rows = runfiles.read_csv(path)
    except (OSError, ValueError, TypeError, csv.Error) as exc:
        raise utils.UserError(f"cannot read {path}: {exc}") from None
    by_epoch = {number(row.get("epoch")): row for row in rows}
    epochs = sorted(e for e in by_epoch if e is not None)
    curves = {"epoch": np.array(epochs)} if epochs else {}
    for column in CURVE_COLUMNS if epochs else ():
        values = np.array([number(by_epoch[e].get(column)) for e in epochs], dtype=float)
        if np.isfinite(values).any():
            curves[column] = values
    return curves


def load_run(path: Path) -> Run:
    if not path.is_dir():
        raise utils.UserError(f"run folder not found: {path}")
    if not (path / "results.json").is_file():
        raise utils.UserError(
            f"{path} is unfinished (no results.json): let the run finish, or "
            "resume it, before comparing"
        )
    data = []
    for file in (path / "args.json", path / "results.json"):
        try:
            data.append(runfiles.read_json(file))
        except (OSError, ValueError) as exc:
            raise utils.UserError(
                f"cannot read {file} (is {path} a run folder of "
                f"part1_classify.py or part2_segment.py?): {exc}"
            ) from None
        if not isinstance(data[-1], dict):
            raise utils.UserError(f"{file} does not hold a JSON object")
    args, results = data
    by_headline = next((t for t, spec in TASKS.items() if spec.headline in results), None)
    task = results.get("task") or args.get("task") or by_headline  # older folders: by headline
    if task not in TASKS:
        raise utils.UserError(
            f"cannot tell whether {path} is a Part 1 or a Part 2 run (task "
            f"{task!r}; its results.json has neither test_accuracy nor mean_ap)"
        )
    return Run(path, args, results, read_curves(path / "metrics.csv"), task)


def load_runs(paths: list[Path]) -> list[Run]:
    resolved = [path.resolve() for path in paths]
    if twice := [path for path, r in zip(paths, resolved) if resolved.count(r) > 1]:
        raise utils.UserError(f"run folder given twice: {twice[0]} and {twice[1]}")
    runs = [load_run(path) for path in paths]
    if len({run.task for run in runs}) > 1:
        listing = ", ".join(f"{run.path} (Part {TASKS[run.task].part})" for run in runs)
        raise utils.UserError(f"cannot compare Part 1 and Part 2 runs together: {listing}")
    # names: the shortest trailing path parts that tell the folders apart (seed0, or a/seed0)
    parts = [r.parts for r in resolved]
    for depth in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            break
    for run, name in zip(runs, names):
        run.name = name
    return runs


# ----------------------------------------------------------------------------- grouping
def recipe_of(args: dict) -> dict:
    """The arguments that define what is trained. None values are dropped, so that an older
    folder lacking a newer (unset) argument still groups with newer folders. Processes multiply
    the global batch (batch_size is per process), so world_size is part of the recipe."""
    recipe = {k: v for k, v in args.items() if k not in NON_RECIPE_ARGS and v is not None}
    environment = args.get("environment") if isinstance(args.get("environment"), dict) else {}
    recipe.setdefault("world_size", environment.get("world_size") or 1)
    return recipe


def canonical(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def format_value(value) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return f"{value:g}" if isinstance(value, float) else str(value)


def short_label(recipe: dict, keys: list[str]) -> str:
    """'model=unet lr=0.002', cut to MAX_LABEL_CHARS with '+N more' for the rest."""
    parts = [f"{k}={format_value(recipe[k]) if k in recipe else '-'}" for k in keys]
    for n in range(len(parts), 0, -1):
        label = " ".join(parts[:n]) + (f" +{len(parts) - n} more" if n < len(parts) else "")
        if len(label) <= MAX_LABEL_CHARS or n == 1:
            return label


def group_key(recipe: dict) -> str:
    """A switch left off equals its absence: older folders predate newer flags (--tta)."""
    return canonical({k: v for k, v in recipe.items() if v is not False})


def group_runs(runs: list[Run]) -> list[Group]:
    """Groups in order of first appearance, labelled by the arguments that set them apart (the
    LABEL_FIRST ones first; one group: the model); labels that come out alike are numbered."""
    members: dict[str, list[Run]] = {}
    for run in runs:
        members.setdefault(group_key(recipe_of(run.args)), []).append(run)
    recipes = [recipe_of(group[0].args) for group in members.values()]
    keys = [
        k
        for k in dict.fromkeys([*LABEL_FIRST, *(k for r in recipes for k in r)])
        if len({canonical(r.get(k, False)) for r in recipes}) > 1
    ]
    groups = []
    for recipe, group in zip(recipes, members.values()):
        label = short_label(recipe, keys) if keys else format_value(recipe.get("model", "all runs"))
        groups.append(Group(label, recipe, {k: recipe.get(k) for k in keys}, group))
    counts, seen = Counter(g.label for g in groups), Counter()
    for group in groups:
        if counts[group.label] > 1:
            seen[group.label] += 1
            group.label = f"{group.label} #{seen[group.label]}"
        for run in group.runs:
            run.group = group.label
    return groups


# ----------------------------------------------------------------------------- numbers
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
    epochs = number(res.get("epochs_trained"))
    if epochs is None and "epoch" in run.curves:
        epochs = float(run.curves["epoch"][-1])
    seconds = number(res.get("train_time_s"))
    metrics = {m: number(res.get(m)) for m in (spec.headline, *spec.extras)} | {
        "epochs": epochs,
        "train_time_min": None if seconds is None else seconds / 60,
        "train_images_per_s": number(res.get("train_images_per_s")),
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
                "differs": g.differs,
                "recipe": g.recipe,
                "metrics": {
                    m: describe([rows[r.name]["metrics"][m] for r in g.runs])
                    for m in (spec.headline, *spec.extras, *RUN_FIELDS)
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


# ----------------------------------------------------------------------------- HTML
def fmt(name: str, value: float | None) -> str:
    formats = {"epochs": "{:.4g}", "train_time_min": "{:.2f}", "train_images_per_s": "{:,.0f}"}
    return "–" if value is None else formats.get(name, "{:.4f}").format(value)


def fmt_stats(name: str, stats: dict) -> str:
    std = "" if stats["std"] is None else f" ± {fmt(name, stats['std'])}"
    return fmt(name, stats["mean"]) + std


def render_html(summary: dict, spec: SimpleNamespace, out: Path) -> str:
    groups, classes, headline = summary["groups"], summary["classes"], spec.headline
    names = [headline, *spec.extras, *RUN_FIELDS]
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
    table = report.html_table
    sections = [
        (
            "Groups",
            "Runs whose arguments differ only in seed (and bookkeeping such as the output "
            f"folder or device) form one group, listed with their {TITLES[headline]}; the last "
            "column lists the arguments that differ between groups.",
            table(
                ["group", "n", "seeds", f"runs ({TITLES[headline]})", "arguments that differ"],
                group_rows,
            ),
        ),
        (
            "Headline metrics per group",
            "Mean ± sample standard deviation (ddof=1) over the "
            "group's runs on the test set; n is the number of runs; a single run shows its value.",
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
        (
            "Training curves",
            "Line: the mean over the group's runs; shaded band: their minimum to maximum.",
            f"<div class='figures'>{curves}</div>",
        ),
        (
            "Per run",
            f"Each run folder with its {TITLES[headline]}, {spec.per_class_title.lower()}, "
            "epochs trained, wall-clock training time and training throughput.",
            table(
                [
                    "run",
                    "group",
                    "seed",
                    "device",
                    TITLES[headline],
                    *classes,
                    *(TITLES[m] for m in RUN_FIELDS),
                ],
                [
                    [
                        r["name"],
                        r["group"],
                        r["seed"],
                        r["device"],
                        fmt(headline, r["headline"]),
                        *(fmt(spec.per_class, r["per_class"].get(c)) for c in classes),
                        *(fmt(m, r["metrics"][m]) for m in RUN_FIELDS),
                    ]
                    for r in summary["runs"]
                ],
            ),
        ),
    ]
    intro = (
        f"{len(summary['runs'])} runs in {len(groups)} group(s); headline metric "
        f"{TITLES[headline]}; created {summary['created']}."
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


# ----------------------------------------------------------------------------- writing
def compare_runs(run_dirs: list, output_dir: str | Path | None = None) -> dict:
    """Compare the run folders, write the report into output_dir (default: a new
    outputs/compare/<timestamp>[-k]) and return what compare.json holds. Input that cannot be
    compared raises utils.UserError before anything is written."""
    if not run_dirs:
        raise utils.UserError("no run folders given")
    runs = load_runs([Path(d) for d in run_dirs])
    out = None if output_dir is None else Path(output_dir)
    if out is not None and (out.exists() and not out.is_dir() or (out / "compare.html").exists()):
        raise utils.UserError(
            f"--output-dir {out} is not a folder or already holds compare.html;"
            " choose another folder"
        )
    spec, groups, now = TASKS[runs[0].task], group_runs(runs), datetime.now()
    summary = summarise(runs, groups, spec)
    out = out or runfiles.new_run_dir(OUTPUT_ROOT, now.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    summary |= {
        "created": now.isoformat(timespec="seconds"),
        "output_dir": str(out),
        "figures": {},
        "html": str(out / "compare.html"),
    }
    for quantity, ylabel in (("loss", "loss"), ("accuracy", spec.accuracy)):
        if plot_curves(groups, quantity, ylabel, out / f"{quantity}_curves.png"):
            summary["figures"][quantity] = f"{quantity}_curves.png"
    runfiles.write_json(out / "compare.json", summary)
    # compare.html last: its presence marks a complete report (and blocks reuse of the folder)
    runfiles.write_text(out / "compare.html", render_html(summary, spec, out))
    return summary


# ----------------------------------------------------------------------------- CLI
def build_parser() -> cli.Parser:
    parser = cli.main_parser(__doc__)
    ignored = ", ".join(sorted(NON_RECIPE_ARGS))
    parser.epilog = textwrap.fill(
        f"Arguments ignored when grouping: {ignored} (the number of processes, "
        "environment.world_size, does count).",
        width=79,
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="run folders, each holding args.json, metrics.csv and results.json "
        "(a run without results.json is unfinished and refused)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        metavar="DIR",
        help="where to write the report (refused if it already holds "
        f"compare.html; default: a new {OUTPUT_ROOT}/YYYYmmdd-HHMMSS[-k])",
    )
    return parser


def run(args) -> None:
    try:
        summary = compare_runs(args.runs, args.output_dir)
    except OSError as exc:  # e.g. an unwritable output folder: one line too
        raise utils.UserError(" ".join(str(exc).split())) from None
    key, groups = summary["headline"], summary["groups"]
    width = max(len("group"), *(len(g["label"]) for g in groups))
    print(f"{'group':<{width}}  {'n':>3}  {key}")
    for g in groups:
        print(f"{g['label']:<{width}}  {g['n']:>3}  {fmt_stats(key, g['metrics'][key])}")
    print(f"report: {summary['html']}")


def main(argv=None) -> None:
    utils.run_cli(run, build_parser(), argv)


if __name__ == "__main__":
    main()
