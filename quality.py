"""Time to quality of finished Part 2 runs: minutes of training and validation until the
validation mean AP first reached the reference's 0.539 and 0.80 (``benchmark.py --quality``)."""

from __future__ import annotations

import math
from pathlib import Path

import runfiles
import utils

QUALITY = (0.539, 0.80)  # the reference's mean AP, the CPU recipe's target


def time_to_quality(run_dir: Path) -> dict:
    """Minutes until the validation mean AP (metrics.csv's val_mean_ap, every --val-ap-every
    epochs) first reached each QUALITY level: the sum of the epochs' epoch_time_s (training and
    validation passes) up to that epoch, so gaps between --resume chunks and data loading do not
    count."""
    if not (run_dir / "results.json").is_file() or not (run_dir / "metrics.csv").is_file():
        raise utils.UserError(f"{run_dir} is not a finished run folder (no results.json)")
    elapsed, reached = 0.0, {}
    for row in runfiles.read_csv(run_dir / "metrics.csv"):
        elapsed += float(row["epoch_time_s"])
        ap = float(row.get("val_mean_ap", "nan"))
        for level in QUALITY:
            if not math.isnan(ap) and level not in reached and ap >= level:
                reached[level] = {"minutes": elapsed / 60, "epoch": int(row["epoch"])}
    results = runfiles.read_json(run_dir / "results.json")
    environment = runfiles.read_json(run_dir / "args.json").get("environment", {})
    return {
        "run": str(run_dir),
        "device": environment.get("gpu") or environment.get("device"),
        "val_mean_ap_reached": {str(level): reached.get(level) for level in QUALITY},
        "train_minutes": elapsed / 60,
        "test_mean_ap": results.get("mean_ap"),
    }


def format_quality(quality: list[dict]) -> str:
    head = " | ".join(f"val AP >= {level}: min (epoch)" for level in QUALITY)
    lines = [f"| run | device | {head} | train min | test mean AP |", "|---|---|" + "---:|" * 4]
    for q in quality:
        cells = [
            "not reached" if r is None else f"{r['minutes']:.1f} ({r['epoch']})"
            for r in q["val_mean_ap_reached"].values()
        ]
        lines.append(
            f"| {q['run']} | {q['device']} | {' | '.join(cells)} | {q['train_minutes']:.1f} | "
            f"{q['test_mean_ap']:.4f} |"
        )
    return "\n".join(lines)
