"""Compare finished run folders of part1_classify.py or of part2_segment.py (not both at once).

Seeds of one recipe form a group: runs whose args.json differ only in seed and in flags that
cannot change the result (output folder, device, ...) and that trained as many epochs under the
same stop conditions; --eval-only folders form groups of their own; a seed twice in a group is
refused. Each group gets mean ± sample std (ddof=1) of the headline metric (test_accuracy, or
mean_ap for Part 2), the per-class values, epochs, training time, throughput and (Part 2)
compute, and its training curves (mean, min-max band). Writes compare.html (self-contained),
compare.json and the curve PNGs into a new output folder.

    for seed in 0 1 2; do python part1_classify.py --seed $seed --output-dir runs/a/seed$seed; done
    python compare.py runs/a/seed*
"""

from __future__ import annotations

import csv
import textwrap
from collections import Counter
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import cli
import runfiles
import settings
import utils
from compare_report import (
    Group,
    Run,
    canonical,
    format_value,
    number,
    plot_curves,
    plot_frontier,
    render_html,
    summarise,
    terminal_table,
)

OUTPUT_ROOT = Path("outputs") / "compare"
# The grouping rule (settings.FLAGS, a reason per flag): runs group by what was trained. Flags
# that cannot change what a run learns are ignored; the measured ones (test-time switches, the
# tested images) count; a run's precision counts as it ran (args.json's "effective"), not as
# its flags asked; a constant schedule is grouped by the epochs it trained, since --resume may
# extend it, any other by its planned length and the epochs trained.
MEASURED = {k: r.why for k, r in settings.FLAGS.items() if r.compare == settings.MEASURED}
# The seed sets a group's members apart; the environment records where they ran.
NON_RECIPE_ARGS = frozenset(
    {k for k, r in settings.FLAGS.items() if r.compare == settings.IGNORED}
    | {"seed", "environment", "effective"}
)
# Flags added after older folders were written, at the value with which they train as those did.
ADDED_LATER = dict(
    val_every=1,
    split="ranges",
    ema=0.0,
    rare_crops=0.0,
    tta_scales=[1.0],
    eval_on="test",
    z_loss=0.0,
)
LABEL_FIRST = ("model", "lr", "epochs", "epochs_trained", "batch_size")  # named first in labels
MAX_LABEL_CHARS = 48
CURVE_COLUMNS = ("train_loss", "val_loss", "train_accuracy", "val_accuracy")
RUN_FIELDS = ("epochs", "train_time_min", "train_images_per_s")


# per part: the number runs are ranked by (headline), results.json's {class: value} key
# (per_class), further metrics worth a column (extras), the compute a run spent (absent in older
# folders), what a run reports of its training (run_fields), what metrics.csv's accuracy measures
TASKS = {
    "classification": SimpleNamespace(
        part=1,
        title="Part 1: Fashion-MNIST classification",
        headline="test_accuracy",
        per_class="per_class_accuracy",
        per_class_title="Per-class test accuracy",
        extras=("mean_per_class_accuracy", "test_loss"),
        compute=(),
        run_fields=RUN_FIELDS,
        accuracy="accuracy",
    ),
    "segmentation": SimpleNamespace(
        part=2,
        title="Part 2: facade segmentation",
        headline="mean_ap",
        per_class="ap",
        per_class_title="Per-class average precision",
        extras=("mean_ap_softmax", "miou", "pixel_accuracy", "test_loss"),
        compute=("train_tflop", "val_tflop"),
        run_fields=(*RUN_FIELDS, "train_tflop", "val_tflop"),
        accuracy="pixel accuracy",
    ),
}


# ----------------------------------------------------------------------------- reading
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


def epochs_trained(results: dict, curves: dict) -> float | None:
    """results.json's epochs_trained, else metrics.csv's last epoch; None for --eval-only."""
    epochs = number(results.get("epochs_trained"))
    if epochs is None and "epoch" in curves:
        epochs = float(curves["epoch"][-1])
    return epochs


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
    curves = read_curves(path / "metrics.csv")
    return Run(path, args, results, curves, task, epochs_trained(results, curves))


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
    """The arguments that define what is trained and tested. None values are dropped, so that an
    older folder lacking a newer (unset, or ADDED_LATER's value) argument still groups with newer
    folders. Processes multiply the global batch (batch_size is per process), so world_size is
    part of the recipe."""
    recipe = {
        k: v
        for k, v in args.items()
        if k not in NON_RECIPE_ARGS and v is not None and (k, v) not in ADDED_LATER.items()
    }
    if args.get("schedule") == "constant":
        recipe.pop("epochs", None)
    recipe["precision"] = settings.saved_precision(args) or "fp32"
    environment = args.get("environment") if isinstance(args.get("environment"), dict) else {}
    recipe.setdefault("world_size", environment.get("world_size") or 1)
    return recipe


def identity(run: Run) -> dict:
    """What seeds of one recipe share: the recipe, and the epochs actually trained (a run its
    time limit stopped early has trained fewer; a time-boxed run resumed to the end has not;
    an --eval-only folder does not record its checkpoint's)."""
    trained = {} if run.epochs_trained is None else {"epochs_trained": run.epochs_trained}
    return recipe_of(run.args) | trained


def short_label(recipe: dict, keys: list[str]) -> str:
    """'model=unet lr=0.002', cut to MAX_LABEL_CHARS with '+N more' for the rest."""
    parts = [f"{k}={format_value(recipe.get(k))}" for k in keys]
    for n in range(len(parts), 0, -1):
        label = " ".join(parts[:n]) + (f" +{len(parts) - n} more" if n < len(parts) else "")
        if len(label) <= MAX_LABEL_CHARS or n == 1:
            return label


def group_key(run: Run) -> str:
    """A switch left off equals its absence: older folders predate newer flags (--tta). An
    --eval-only folder never joins a training run's group, whatever its recipe."""
    eval_only = run.args.get("eval_only") is not None
    return canonical([eval_only, {k: v for k, v in identity(run).items() if v is not False}])


def differing(identities: list[dict]) -> list[str]:
    """The keys whose values differ between groups, the LABEL_FIRST ones first."""
    keys = dict.fromkeys([*LABEL_FIRST, *(k for r in identities for k in r)])
    return [k for k in keys if len({canonical(r.get(k, False)) for r in identities}) > 1]


def group_runs(runs: list[Run]) -> list[Group]:
    """Groups in order of first appearance, labelled by what sets them apart (epochs_trained
    only where a run stopped short of its epochs; one group: the model; eval-only groups say
    so); labels that come out alike are numbered. A seed that appears twice in a group is
    refused: those runs are not independent samples of the recipe."""
    members: dict[str, list[Run]] = {}
    for run in runs:
        members.setdefault(group_key(run), []).append(run)
    identities = [identity(group[0]) for group in members.values()]
    keys = differing(identities)
    complete = all(r.get("epochs_trained") in (None, r.get("epochs")) for r in identities)
    label_keys = [k for k in keys if not (complete and k == "epochs_trained")]
    groups = []
    for ident, group in zip(identities, members.values()):
        eval_only = group[0].args.get("eval_only") is not None
        label = short_label(ident, label_keys) if label_keys else ident.get("model", "all runs")
        label = f"eval-only {label}" if eval_only else str(label)
        recipe = {k: v for k, v in ident.items() if k != "epochs_trained"}
        differs = {k: ident.get(k) for k in keys}
        groups.append(Group(label, recipe, differs, group, eval_only))
    counts, seen = Counter(g.label for g in groups), Counter()
    for group in groups:
        if counts[group.label] > 1:
            seen[group.label] += 1
            group.label = f"{group.label} #{seen[group.label]}"
        for run in group.runs:
            run.group = group.label
        refuse_repeated_seeds(group)
    return groups


def refuse_repeated_seeds(group: Group) -> None:
    seeds = [run.args.get("seed") for run in group.runs]
    if repeated := [s for s in seeds if s is not None and seeds.count(s) > 1]:
        first, second, *_ = [run.path for run, s in zip(group.runs, seeds) if s == repeated[0]]
        raise utils.UserError(
            f"{first} and {second} are both seed {repeated[0]} of one recipe (group "
            f"{group.label}): compare distinct seeds, or runs that differ in a recipe argument"
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
    if spec.compute and plot_frontier(summary, spec, out / "frontier.png"):
        summary["figures"]["frontier"] = "frontier.png"
    runfiles.write_json(out / "compare.json", summary)
    # compare.html last: its presence marks a complete report (and blocks reuse of the folder)
    runfiles.write_text(out / "compare.html", render_html(summary, spec, out))
    return summary


# ----------------------------------------------------------------------------- CLI
def build_parser() -> cli.Parser:
    parser = cli.main_parser(__doc__)
    ignored = ", ".join(sorted(NON_RECIPE_ARGS))
    measured = "; ".join(f"{k}: {why}" for k, why in MEASURED.items())
    parser.epilog = textwrap.fill(
        f"Arguments ignored when grouping: {ignored} (the number of processes, "
        "environment.world_size, does count). Every other argument, and the epochs actually "
        "trained, must match within a group (a run's precision as it ran; the planned epochs "
        f"only for a schedule that is not constant). These count too ({measured}). --eval-only "
        "folders are grouped by their checkpoint's recipe, apart from training runs. A seed "
        "repeated within a group is refused.",
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
    print(terminal_table(summary, TASKS[summary["task"]]))
    print(f"report: {summary['html']}")


def main(argv=None) -> None:
    utils.run_cli(run, build_parser(), argv)


if __name__ == "__main__":
    main()
