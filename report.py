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

import utils


@dataclass
class Figure:
    path: str  # relative to the run folder
    title: str
    explanation: str


@dataclass
class Page:
    """One run's report: a summary (ours beside the reference), tables, figures, console lines."""
    title: str
    summary: list[tuple[str, str, str]]  # (quantity, this run, reference report)
    tables: list[tuple[str, list[str], list[list]]] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


TRAINING_FIGURES = [
    Figure("figures/loss_curve.png", "Loss per epoch",
           "Training loss (mean over the epoch's batches) and validation loss (over the whole "
           "validation split); the gap between them shows over-fitting."),
    Figure("figures/accuracy_curve.png", "Accuracy per epoch",
           "Training and validation accuracy (pixel accuracy in Part 2) after every epoch."),
]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> None:
    with utils.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)


# ----------------------------------------------------------------------------- plots
def plot_curves(rows: list[dict], keys: list[str], path: Path, ylabel: str, title: str) -> None:
    fig, ax = _plt().subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in rows]
    for key in keys:
        ax.plot(epochs, [r[key] for r in rows], marker="o", ms=3, label=key.replace("_", " "))
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_bars(names: list[str], values: list[float], path: Path, ylabel: str, title: str,
              reference: list[float] | None = None) -> None:
    """Per-class values, with the reference report's values as hatched bars beside them."""
    fig, ax = _plt().subplots(figsize=(max(5, 0.8 * len(names)), 4))
    x = np.arange(len(names))
    width = 0.4 if reference else 0.8
    bars = ax.bar(x, values, width, color="tab:blue", label="this run")
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=7)
    if reference:
        ax.bar(x + width, reference, width, color="white", edgecolor="gray", hatch="//",
               label="reference report")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xticks(x + (width / 2 if reference else 0), names, rotation=45, ha="right")
    ax.set(ylabel=ylabel, title=title, ylim=(0, 1.05))
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


def plot_image_grid(images: list[np.ndarray], titles: list[str], path: Path, cols: int,
                    title: str, cmap: str | None = None, title_colors: list[str] | None = None,
                    legend: list[tuple[str, tuple[int, int, int]]] | None = None) -> None:
    """Images in a grid; ``legend`` adds a colour key (class name, RGB) under the grid."""
    plt = _plt()
    rows = max(1, math.ceil(len(images) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.75 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (img, t) in enumerate(zip(images, titles)):
        ax = axes.flat[k]
        ax.imshow(img, cmap=cmap, interpolation="nearest")
        ax.set_title(t, fontsize=7, color=(title_colors[k] if title_colors else "black"))
    if legend:
        from matplotlib.patches import Patch
        handles = [Patch(facecolor=np.array(rgb) / 255, edgecolor="gray", label=name)
                   for name, rgb in legend]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7,
                   bbox_to_anchor=(0.5, -0.02))
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
def add_training_summary(run_dir: Path, results: dict) -> dict:
    """Epochs, training time and rate from metrics.csv (absent for --eval-only folders)."""
    rows = utils.read_csv(run_dir / "metrics.csv")
    if rows:
        results["epochs_trained"] = rows[-1]["epoch"]
        results["train_time_s"] = sum(r["epoch_time_s"] for r in rows)
        results["train_images_per_s"] = sum(r["train_images_per_s"] for r in rows) / len(rows)
    return results


def finish_run(run_dir: Path, results: dict, page: Page, class_names: list[str], log) -> dict:
    """The one output path of both parts: results.json, training curves, confusion matrix,
    report.html, and the closing lines on the console and in log.txt."""
    utils.write_json(run_dir / "results.json", results)
    rows = utils.read_csv(run_dir / "metrics.csv")
    if rows:
        plot_curves(rows, ["train_loss", "val_loss"], run_dir / TRAINING_FIGURES[0].path, "loss",
                    "Loss per epoch")
        accuracy = [k for k in ("train_accuracy", "val_accuracy") if k in rows[0]]
        plot_curves(rows, accuracy, run_dir / TRAINING_FIGURES[1].path, "accuracy",
                    "Accuracy per epoch")
    plot_confusion(results["confusion_matrix"], class_names, run_dir / "figures/confusion_matrix.png",
                   "Test confusion matrix (each row sums to 1)")
    report = write_report(run_dir, page)
    (log.info if log else print)("\n".join([*page.lines, f"Report: {report}"]))
    return results


CONFUSION_FIGURE = Figure("figures/confusion_matrix.png", "Confusion matrix",
                          "Row c: how the test samples (pixels in Part 2) of true class c were "
                          "classified; the diagonal is each class's accuracy.")


def write_report(run_dir: Path, page: Page) -> Path:
    """A self-contained report.html: summary beside the reference, tables, every figure
    embedded as base64 PNG under a title and one line of explanation."""
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
             "color:#222}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
             "th{background:#f3f3f3}td:first-child{text-align:left}"
             "img{max-width:100%;margin:.5em 0 1.5em}p.why{color:#555;margin:.2em 0}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(page.title)}"
             f"</title><style>{style}</style></head><body><h1>{html.escape(page.title)}</h1>",
             html_table(["", "this run", "reference report"], [list(r) for r in page.summary])]
    for heading, header, rows in page.tables:
        parts += [f"<h2>{html.escape(heading)}</h2>", html_table(header, rows)]
    parts.append("<h2>Figures</h2>")
    for figure in page.figures:
        path = run_dir / figure.path
        if path.exists():
            data = base64.b64encode(path.read_bytes()).decode()
            parts.append(f"<h3>{html.escape(figure.title)}</h3>"
                         f"<p class='why'>{html.escape(figure.explanation)}</p>"
                         f"<img alt='{html.escape(figure.title)}' "
                         f"src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    out = run_dir / "report.html"
    utils.write_text(out, "\n".join(parts))
    return out


def html_table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
