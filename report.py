"""What a finished run shows a person: figures (matplotlib, Agg), results.json and a
self-contained report.html. Both parts write their outputs through ``finish_run``."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import runfiles
from utils import UserError


@dataclass
class Figure:
    path: str  # relative to the run folder
    title: str
    explanation: str
    wide: bool = False  # the page's full width (image grids), else half of it


@dataclass
class Page:
    """One run's report: a summary (rows with a reference value are shown beside it, the others
    as this run's details), tables, figures, console lines."""

    title: str
    summary: list[tuple[str, str, str]]  # (quantity, this run, reference report)
    tables: list[tuple[str, list[str], list[list]]] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


TRAINING_FIGURES = [
    Figure(
        "figures/loss_curve.png",
        "Loss per epoch",
        "Training loss (mean over the epoch's batches) and validation loss (over the whole "
        "validation split); the gap between them shows over-fitting.",
    ),
    Figure(
        "figures/accuracy_curve.png",
        "Accuracy per epoch",
        "Training and validation accuracy (pixel accuracy in Part 2) after every epoch.",
    ),
]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    with runfiles.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)


# ----------------------------------------------------------------------------- plots
def plot_curves(rows: list[dict], keys: list[str], path: Path, ylabel: str, title: str) -> None:
    fig, ax = _plt().subplots(figsize=(6, 4))
    for key in keys:  # epochs without a value (not validated: --val-every) are left out
        points = [(r["epoch"], r[key]) for r in rows if r[key] == r[key]]
        if points:
            ax.plot(*zip(*points), marker="o", ms=3, label=key.replace("_", " "))
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    ax.xaxis.set_major_locator(_plt().MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_bars(
    names: list[str],
    values: list[float],
    path: Path,
    ylabel: str,
    title: str,
    reference: list[float] | None = None,
) -> None:
    """Per-class values, with the reference report's values as hatched bars beside them (the
    legend above 1, where it hides no bar)."""
    fig, ax = _plt().subplots(figsize=(max(5, 0.8 * len(names)), 4))
    x = np.arange(len(names))
    width = 0.4 if reference else 0.8
    bars = ax.bar(x, values, width, color="tab:blue", label="this run")
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=7)
    if reference:
        ref = ax.bar(
            x + width,
            reference,
            width,
            color="white",
            edgecolor="gray",
            hatch="//",
            label="reference report",
        )
        ax.bar_label(ref, labels=[f"{v:.3f}" for v in reference], fontsize=7, color="gray")
        ax.legend(loc="upper center", ncol=2, fontsize=8)
    ax.set_xticks(x + (width / 2 if reference else 0), names, rotation=45, ha="right")
    ax.set(
        ylabel=ylabel,
        title=title,
        ylim=(0, 1.22 if reference else 1.05),
        yticks=np.linspace(0, 1, 6),
    )
    save_figure(fig, path)


def plot_confusion(matrix, names: list[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix (sklearn's display: value labels, contrasting text)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    m = np.asarray(matrix, dtype=np.float64)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    fig, ax = _plt().subplots(figsize=(1.5 + 0.6 * len(names), 1 + 0.6 * len(names)))
    display = ConfusionMatrixDisplay(norm, display_labels=names)
    display.plot(ax=ax, cmap="Blues", values_format=".2f", colorbar=False, xticks_rotation=45)
    display.im_.set_clim(0, 1)
    for text in display.text_.flat:
        text.set_fontsize(7)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    save_figure(fig, path)


def plot_pr_curves(
    curves: dict, names: list[str], palette: list[tuple[int, int, int]], path: Path, title: str
) -> None:
    """Precision-recall curve per class: ``curves[name]`` holds its "recall" and "precision";
    a class without one is left out. Lines take the class's RGB colour, grey for black."""
    fig, ax = _plt().subplots(figsize=(6, 5))
    for name, rgb in zip(names, palette):
        if curves.get(name):
            color = [v / 255 for v in rgb] if any(rgb) else "gray"
            ax.plot(curves[name]["recall"], curves[name]["precision"], label=name, color=color)
    ax.set(xlabel="recall", ylabel="precision", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_image_grid(
    images: list,
    titles: list[str],
    path: Path,
    cols: int,
    title: str,
    cmap: str | None = None,
    title_colors: list[str] | None = None,
    legend: list[tuple[str, tuple[int, int, int]]] | None = None,
    tile: float = 1.6,
) -> None:
    """Images in a grid of ``tile``-inch cells (None leaves a cell empty); ``legend`` adds a
    colour key (class name, RGB) right under the grid."""
    plt = _plt()
    rows = max(1, math.ceil(len(images) / cols))
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(tile * cols, (tile + 0.3) * rows + 0.5),
        squeeze=False,
        layout="constrained",
    )
    for ax in axes.flat:
        ax.axis("off")
    for k, (img, t) in enumerate(zip(images, titles)):
        if img is not None:
            axes.flat[k].imshow(img, cmap=cmap, interpolation="nearest")
        axes.flat[k].set_title(t, fontsize=7, color=title_colors[k] if title_colors else "black")
    if legend:
        from matplotlib.patches import Patch

        handles = [
            Patch(facecolor=np.array(rgb) / 255, edgecolor="gray", label=name)
            for name, rgb in legend
        ]
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncol=len(handles),
            fontsize=9,
            title="class colours",
            title_fontsize=9,
            frameon=False,
        )
    fig.suptitle(title)
    save_figure(fig, path)


def filter_mosaic(weight: torch.Tensor) -> np.ndarray:
    """(out, in, k, k) kernels -> one grey image via torchvision's make_grid: a row per output
    channel, a column per input channel (a square grid for one input channel); each kernel is
    scaled to [0, 1] on its own so that its pattern shows; white 1-pixel gaps."""
    from torchvision.utils import make_grid

    w = weight.detach().float().cpu()
    out_c, in_c, kh, kw = w.shape
    tiles = w.reshape(out_c * in_c, 1, kh, kw)
    per_row = math.ceil(math.sqrt(out_c)) if in_c == 1 else in_c
    grid = make_grid(tiles, nrow=per_row, padding=1, normalize=True, scale_each=True, pad_value=1)
    return grid[0].numpy()


def plot_filters(weight: torch.Tensor, path: Path, title: str) -> None:
    mosaic = filter_mosaic(weight)
    size = (min(12, 2 + 0.25 * mosaic.shape[1]), min(12, 2 + 0.25 * mosaic.shape[0]))
    fig, ax = _plt().subplots(figsize=size)
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    ax.set_title(title)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- the run's outputs
def read_results(run_dir: Path, headline: str, part: str) -> dict:
    """results.json of a finished run folder of ``part`` (--report-only), which must hold the
    part's ``headline`` metric."""
    if not (run_dir / "results.json").is_file():
        raise UserError(f"{run_dir} has no results.json: not a finished {part} run folder")
    results = runfiles.read_json(run_dir / "results.json")
    if headline not in results:
        raise UserError(f"{run_dir} is not a {part} run folder")
    return results


def checkpoint_rows(results: dict) -> list[tuple[str, str, str]]:
    """Summary rows of both parts: the tested checkpoint and, if this run trained, its epochs and
    training time."""
    rows = [
        ("tested checkpoint", f"{results['checkpoint']} (epoch {results['checkpoint_epoch']})", "")
    ]
    if "epochs_trained" in results:
        rows += [
            ("epochs", str(results["epochs_trained"]), ""),
            ("training time", duration(results["train_time_s"]), ""),
        ]
    return rows


def add_training_summary(run_dir: Path, results: dict) -> dict:
    """Epochs, training time and rate from metrics.csv (absent for --eval-only folders)."""
    rows = runfiles.read_csv(run_dir / "metrics.csv")
    if rows:
        results["epochs_trained"] = rows[-1]["epoch"]
        results["train_time_s"] = sum(r["epoch_time_s"] for r in rows)
        results["train_images_per_s"] = sum(r["train_images_per_s"] for r in rows) / len(rows)
    return results


def finish_run(run_dir: Path, results: dict, page: Page, class_names: list[str], log) -> dict:
    """The one output path of both parts: results.json, training curves, confusion matrix,
    report.html, and the closing lines on the console and in log.txt."""
    runfiles.write_json(run_dir / "results.json", results)
    rows = runfiles.read_csv(run_dir / "metrics.csv")
    if rows:
        plot_curves(
            rows,
            ["train_loss", "val_loss"],
            run_dir / TRAINING_FIGURES[0].path,
            "loss",
            "Loss per epoch",
        )
        accuracy = [k for k in ("train_accuracy", "val_accuracy") if k in rows[0]]
        plot_curves(
            rows, accuracy, run_dir / TRAINING_FIGURES[1].path, "accuracy", "Accuracy per epoch"
        )
    plot_confusion(
        results["confusion_matrix"],
        class_names,
        run_dir / CONFUSION_FIGURE.path,
        "Test confusion matrix (each row sums to 1)",
    )
    report = write_report(run_dir, page)
    (log.info if log else print)("\n".join([*page.lines, f"Report: {report}"]))
    return results


CONFUSION_FIGURE = Figure(
    "figures/confusion_matrix.png",
    "Confusion matrix",
    "Row c: how the test samples (pixels in Part 2) of true class c were "
    "classified; the diagonal is each class's accuracy.",
)


STYLE = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1.5em;color:#222;
line-height:1.4}
h1{margin-bottom:.2em}h2{margin:1.2em 0 .4em;font-size:1.25em}h3{margin:0 0 .2em;font-size:1.05em}
p.why{color:#555;margin:0 0 .5em;font-size:.92em}
.tables{display:flex;flex-wrap:wrap;gap:0 3em;align-items:flex-start}
table{border-collapse:collapse;margin:.3em 0 1em;font-size:.92em;display:block;
overflow-x:auto;max-width:100%}
td,th{border:1px solid #ddd;padding:4px 10px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}tr:nth-child(even) td{background:#fafafa}
.figures{display:grid;grid-template-columns:1fr 1fr;gap:1.5em}
figure{margin:0;padding:1em;border:1px solid #e4e4e4;border-radius:6px;min-width:0}
figure.wide{grid-column:1/-1}figure img{display:block;max-width:100%;margin:auto}
@media(max-width:800px){.figures{grid-template-columns:1fr}}
"""


def write_report(run_dir: Path, page: Page) -> Path:
    """A self-contained report.html: the results beside the reference report's, this run's
    details, the tables, then every figure embedded as base64 PNG under a title and one line of
    explanation (two to a row; wide ones across the page)."""
    compared = [list(r) for r in page.summary if r[2]]
    details = [list(r[:2]) for r in page.summary if not r[2]]
    blocks = [
        [
            (
                "Compared with the reference report",
                ["result", "this run", "reference report"],
                compared,
            ),
            ("This run", [], details),
        ],
        *([t] for t in page.tables),
    ]
    tables = "".join(
        "<div>"
        + "".join(
            f"<h2>{html.escape(heading)}</h2>{html_table(head, rows)}"
            for heading, head, rows in column
            if rows
        )
        + "</div>"
        for column in blocks
    )
    figures = "".join(figure_html(run_dir, f) for f in page.figures)
    out = run_dir / "report.html"
    runfiles.write_text(
        out,
        html_page(
            page.title,
            [f"<div class='tables'>{tables}</div>", f"<div class='figures'>{figures}</div>"],
        ),
    )
    return out


def html_page(title: str, body: list[str]) -> str:
    """A self-contained HTML page in the reports' style: ``title`` as heading, then ``body``."""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def figure_html(folder: Path, figure: Figure, missing: str = "") -> str:
    """The figure's title, its line of explanation and its PNG embedded; if the PNG is missing,
    the title and ``missing`` (or nothing, without it)."""
    path, title = folder / figure.path, html.escape(figure.title)
    if not path.is_file():
        return (
            f"<figure class=wide><h3>{title}</h3><p>{html.escape(missing)}</p></figure>\n"
            if missing
            else ""
        )
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f"<figure{' class=wide' if figure.wide else ''}><h3>{title}</h3>"
        f"<p class='why'>{html.escape(figure.explanation)}</p>"
        f"<img alt='{title}' src='data:image/png;base64,{data}'></figure>\n"
    )


def html_table(header: list[str], rows: list[list]) -> str:
    """Cells escaped, floats to 4 significant digits; no header row when ``header`` is empty."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table>{f'<tr>{head}</tr>' if header else ''}{body}</table>"


def duration(seconds: float) -> str:
    """'42 s', '3.5 min' or '2.1 h'."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
