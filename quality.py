"""Time to quality of finished Part 2 runs: wall minutes until the validation mean AP first
reached the reference's 0.539 and 0.80, read from the run's log (``benchmark.py --quality``)."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import runfiles
import utils

LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (.*)$")
EPOCH_AP = re.compile(r"epoch (\d+)/\d+ .*val_mean_ap=([0-9.]+)")
QUALITY = (0.539, 0.80)  # the reference's mean AP, the CPU recipe's target


def time_to_quality(run_dir: Path) -> dict:
    """Wall minutes from the run's first log line until its validation mean AP (metrics.csv's
    val_mean_ap, logged every --val-ap-every epochs) first reached each QUALITY level."""
    if not (run_dir / "results.json").is_file() or not (run_dir / "log.txt").is_file():
        raise utils.UserError(f"{run_dir} is not a finished run folder (no results.json)")
    stamps, reached = [], {}
    for line in (run_dir / "log.txt").read_text().splitlines():
        match = LOG_LINE.match(line)
        if not match:
            continue
        stamps.append(datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f"))
        ap = EPOCH_AP.search(match[2])
        for level in QUALITY:
            if ap and level not in reached and float(ap[2]) >= level:
                minutes = (stamps[-1] - stamps[0]).total_seconds() / 60
                reached[level] = {"minutes": minutes, "epoch": int(ap[1])}
    results = runfiles.read_json(run_dir / "results.json")
    environment = runfiles.read_json(run_dir / "args.json").get("environment", {})
    return {
        "run": str(run_dir),
        "device": environment.get("gpu") or environment.get("device"),
        "val_mean_ap_reached": {str(level): reached.get(level) for level in QUALITY},
        "wall_minutes": (stamps[-1] - stamps[0]).total_seconds() / 60 if stamps else None,
        "test_mean_ap": results.get("mean_ap"),
    }


def format_quality(quality: list[dict]) -> str:
    head = " | ".join(f"val AP >= {level}: min (epoch)" for level in QUALITY)
    lines = [f"| run | device | {head} | wall min | test mean AP |", "|---|---|" + "---:|" * 4]
    for q in quality:
        cells = [
            "not reached" if r is None else f"{r['minutes']:.1f} ({r['epoch']})"
            for r in q["val_mean_ap_reached"].values()
        ]
        lines.append(
            f"| {q['run']} | {q['device']} | {' | '.join(cells)} | {q['wall_minutes']:.1f} | "
            f"{q['test_mean_ap']:.4f} |"
        )
    return "\n".join(lines)
