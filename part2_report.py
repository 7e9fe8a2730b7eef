"""Part 2's outputs: results.json, the figures and report.html of a finished training or
--eval-only, and --report-only's rebuild, with the reference report's numbers beside ours."""

from __future__ import annotations

from pathlib import Path

import datasets
import models
import report

NAMES = datasets.FACADE_CLASSES
NUM_CLASSES = len(NAMES)
TASK = "segmentation"
REFERENCE_AP = {
    "others": 0.607,
    "facade": 0.768,
    "pillar": 0.122,
    "window": 0.780,
    "balcony": 0.417,
}  # the reference report; mean 0.539
FIGURES = [
    *report.TRAINING_FIGURES,
    report.Figure(
        "figures/per_class_ap.png",
        "Per-class average precision",
        "AP of each class over all test pixels (sklearn's definition, raw scores), "
        "beside the reference report's values.",
    ),
    report.Figure(
        "figures/pr_curves.png",
        "Precision-recall curves",
        "Precision against recall of each class as the score threshold falls; the "
        "area under each curve is its AP.",
    ),
    report.CONFUSION_FIGURE,
    report.Figure(
        "figures/predictions.png",
        "Test predictions",
        "Fixed test images: the photo, the ground truth and the network's prediction, "
        "in the dataset's class colours (key under the images).",
        wide=True,
    ),
]


def write_outputs(run_dir: Path, test: dict, tested: dict, model, log) -> dict:
    """results.json, the other figures and report.html of a finished training or --eval-only:
    the test metrics, then what ``tested`` says of the checkpoint, model and data."""
    per_class = {k: dict(zip(NAMES, test[k])) for k in ("ap", "ap_softmax", "iou", "pr_curves")}
    results = {
        "task": TASK,
        "mean_ap": test["mean_ap"],
        "ap": per_class["ap"],
        "mean_ap_softmax": test["mean_ap_softmax"],
        "ap_softmax": per_class["ap_softmax"],
        "pixel_accuracy": test["pixel_accuracy"],
        "miou": test["miou"],
        "iou": per_class["iou"],
        "test_loss": test["loss"],
        "test_images_per_s": test["images_per_s"],
        "confusion_matrix": test["confusion_matrix"],
        "pr_curves": per_class["pr_curves"],
        "parameters": models.count_parameters(model),
    }
    return publish(run_dir, results | tested, log)


def rebuild_report(run_dir: Path) -> dict:
    """--report-only: figures and report.html again from results.json and metrics.csv (the
    prediction figure needs the model and is kept as it is)."""
    return publish(run_dir, report.read_results(run_dir, "mean_ap", "Part 2"), None)


def publish(run_dir: Path, results: dict, log) -> dict:
    results = report.add_training_summary(run_dir, results)
    report.plot_bars(
        NAMES,
        list(results["ap"].values()),
        run_dir / "figures/per_class_ap.png",
        "average precision",
        f"Per-class AP on test pixels (mean {results['mean_ap']:.4f})",
        reference=list(REFERENCE_AP.values()),
    )
    report.plot_pr_curves(
        results.get("pr_curves", {}),
        NAMES,
        datasets.FACADE_PALETTE,
        run_dir / "figures/pr_curves.png",
        "Precision-recall per class (test pixels)",
    )
    return report.finish_run(run_dir, results, report_page(results), NAMES, log)


VIEWED_ON = {"test": "test_dev", "val": "the run's validation images (--eval-on val)"}


def tta_text(results: dict) -> str:
    scales = results.get("tta_scales") or [1.0]
    if not results.get("tta"):
        return "no"
    return "yes" if scales == [1.0] else "yes, at scales " + ", ".join(f"{s:g}" for s in scales)


def report_page(results: dict) -> report.Page:
    reference_mean = sum(REFERENCE_AP.values()) / NUM_CLASSES
    summary = [
        ("model", results["model"], "resolution-keeping FCN"),
        ("mean AP (raw scores)", f"{results['mean_ap']:.4f}", f"{reference_mean:.3f}"),
        ("test-time flip", tta_text(results), "no"),
        ("tested on", VIEWED_ON[results.get("evaluated_on", "test")], "test_dev"),
        ("mean AP (softmax)", f"{results['mean_ap_softmax']:.4f}", ""),
        ("mIoU", f"{results['miou']:.4f}", ""),
        ("pixel accuracy", f"{results['pixel_accuracy']:.4f}", ""),
        ("GFLOP per image", f"{results['gflops_per_image']:.1f}", "38.8"),
        *report.checkpoint_rows(results),
    ]
    ap, softmax, iou = results["ap"], results["ap_softmax"], results["iou"]
    table = [
        [n, f"{ap[n]:.4f}", f"{REFERENCE_AP[n]:.3f}", f"{softmax[n]:.4f}", f"{iou[n]:.4f}"]
        for n in NAMES
    ]
    header = ["class", "AP", "reference AP", "AP (softmax)", "IoU"]
    tables = [("Per-class results on test pixels", header, table)]
    lines = [f"{n}: AP = {results['ap'][n]:.4f}" for n in NAMES]
    lines.append(f"Mean AP = {results['mean_ap']:.4f}")
    return report.Page("Part 2: facade semantic segmentation", summary, tables, FIGURES, lines)
