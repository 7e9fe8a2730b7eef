"""benchmark.py's reading of results: the target table, time to quality from a run's log, and the
per-layer profile (on small images; the timings themselves are the benchmark's job)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import allocator
import benchmark
import benchmark_checks
import hardware
import quality
import runfiles
import utils
from conftest import HANG_GUARD_S


def make_quality_run(folder, aps, finished=True, gap_after=None):
    """A Part 2 run folder of 60-second epochs with the given val_mean_ap; its log has an hour's
    gap after epoch ``gap_after`` (a --resume the next day, say)."""
    folder.mkdir()
    rows = [{"epoch": e, "val_loss": 0.5, "val_mean_ap": ap, "epoch_time_s": 60.0}
            for e, ap in enumerate(map(float, aps), 1)]  # fmt: skip
    runfiles.write_csv(folder / "metrics.csv", rows)
    lines, hour = ["2026-01-01 10:00:00,000 run folder: x"], 10
    for epoch, ap in enumerate(aps, 1):
        lines.append(f"2026-01-01 {hour}:{epoch:02d}:30,000 epoch {epoch}/{len(aps)}  "
                     f"val_mean_ap={ap}  epoch_time_s=60")  # fmt: skip
        hour += epoch == gap_after
    (folder / "log.txt").write_text("\n".join(lines) + "\n")
    (folder / "args.json").write_text(json.dumps({"environment": {"device": "cpu"}}))
    if finished:
        (folder / "results.json").write_text(json.dumps({"mean_ap": 0.75}))
    return folder


def test_time_to_quality_sums_epoch_times_not_the_clock(tmp_path):
    """The 0.539 level is reached at epoch 4, after 4 one-minute epochs; the hour between epoch
    2 and a resumed epoch 3 is not training time."""
    aps = ["nan", "0.5", "nan", "0.6", "0.55", "0.79"]
    run = make_quality_run(tmp_path / "r", aps, gap_after=2)
    found = quality.time_to_quality(run)
    assert found["val_mean_ap_reached"] == {"0.539": {"minutes": 4.0, "epoch": 4}, "0.8": None}
    assert found["train_minutes"] == pytest.approx(6.0)
    assert found["test_mean_ap"] == 0.75 and found["device"] == "cpu"
    table = quality.format_quality([found])
    assert "| 4.0 (4) | not reached | 6.0 | 0.7500 |" in table


def test_time_to_quality_refuses_an_unfinished_run(tmp_path):
    run = make_quality_run(tmp_path / "r", ["0.9"], finished=False)
    with pytest.raises(utils.UserError, match="not a finished run"):
        quality.time_to_quality(run)


def test_targets_use_the_default_rows_of_each_phase():
    def row(pipeline, precision, phase, speedup):
        return {"part": "part2", "pipeline": pipeline, "precision": precision, "phase": phase,
                "speedup_vs_naive": speedup}  # fmt: skip

    rows = [
        row("naive", "fp32", "train", 1.0),
        row("ours", "fp32", "train", 1.35),
        row("ours", "fp32+cl", "train", 1.1),
        row("ours", "fp32", "eval", 3.0),
        row("ours", "fp32+cl", "eval", 4.5),
    ]
    avx2 = {"part2/train": "fp32", "part2/eval": "fp32+cl"}
    found = benchmark_checks.targets(rows, {"ap_curves_s": 4.0}, avx2)
    assert [(t["value"], t["target"], t["met"]) for t in found] == [
        (1.35, 1.3, True),  # fp32 training: 1.3x naive
        (4.5, 4.0, True),
        (4.0, 5.0, True),
    ]
    bf16 = {"part2/train": "bf16+cl", "part2/eval": "bf16+cl"}
    table = benchmark_checks.format_targets(benchmark_checks.targets(rows, {}, bf16))
    assert "| not measured | >= 3 | - |" in table and "| not measured | <= 5 | - |" in table


def test_the_default_rows_follow_the_policy_and_are_checked_against_the_fastest():
    avx2 = benchmark_checks.default_variants("cpu", hardware.Hardware())
    assert avx2 == {"part1/train": "fp32+cl", "part1/eval": "fp32+cl",
                    "part2/train": "fp32+micro1", "part2/eval": "fp32+cl"}  # fmt: skip
    native = benchmark_checks.default_variants(
        "cpu", hardware.Hardware(cpu_bf16_units=True, onednn_avx512=True)
    )
    assert set(native.values()) == {"bf16+cl"}
    assert benchmark_checks.native_amp_dtypes("cpu", hardware.Hardware()) == []
    t4 = hardware.Hardware(cuda=True, cuda_capability=(7, 5))
    assert benchmark_checks.native_amp_dtypes("cuda", t4) == ["fp16"]
    rows = [
        {"part": "part2", "pipeline": "ours", "phase": "train", "precision": p, "images_per_s": v}
        for p, v in (("fp32", 0.70), ("fp32+cl", 0.72), ("fp32+compile", 5.0))
    ]
    (found,) = benchmark_checks.fastest_check(rows, {"part2/train": "fp32"})
    assert found["fastest"] == "fp32+cl" and found["ok"]  # 0.70 / 0.72 is within 5 %
    rows[1]["images_per_s"] = 0.80
    (found,) = benchmark_checks.fastest_check(rows, {"part2/train": "fp32"})
    assert not found["ok"] and found["default_vs_fastest"] == pytest.approx(0.875)


def test_profile_names_the_convolutions_of_a_training_step(monkeypatch):
    g = torch.Generator().manual_seed(0)

    def small_facades(args, count):
        images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=g)
        return images, torch.randint(0, 5, (count, 32, 32), dtype=torch.uint8, generator=g), None

    monkeypatch.setattr(benchmark, "load_part2", small_facades)
    profile = benchmark.profile_part2(None, "cpu", None, True, steps=1)
    assert 0 < len(profile) <= 15
    assert any("convolution" in p["op"] for p in profile)
    shares = [p["share"] for p in profile]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9


def test_benchmark_runs_as_a_script(tmp_path):
    """Part 1 on random data, a few steps, and --quality: every section reaches the JSON. It
    times only what this machine computes natively, so it takes seconds on any CPU."""
    run = make_quality_run(tmp_path / "r", ["0.6", "0.85"])
    out = tmp_path / "bench.json"
    argv = "--parts 1 --synthetic --scale 0.05 --threads 1 --quality".split()
    proc = subprocess.run(
        [sys.executable, "benchmark.py", *argv, str(run), "--output", str(out)],
        cwd=Path(benchmark.__file__).parent,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(out.read_text())
    hw = hardware.read_hardware()
    expected = benchmark_checks.default_variants("cpu", hw)
    assert info["default_flags"] == expected
    defaults = [r for r in info["rows"] if r["default"]]
    assert [(r["phase"], r["precision"]) for r in defaults] == [
        ("train", expected["part1/train"]),
        ("eval", expected["part1/eval"]),
    ]
    timed = {r["precision"] for r in info["rows"] if r["pipeline"] == "ours"}
    native = benchmark_checks.native_amp_dtypes("cpu", hw)
    assert timed == {p + cl for p in ["fp32", *native] for cl in ("", "+cl")}
    assert set(info["peak_flops"]) == {"fp32", *native}  # no peak of an emulated dtype
    assert [f["part"] for f in info["default_is_fastest"]] == ["part1", "part1"]
    assert [t["met"] for t in info["targets"]] == [None] * 3  # Part 2 was not run
    alloc = {r["allocator"]: r for r in info["allocator"]}
    assert [(r["part"], r["allocator"]) for r in info["allocator"]] == [(1, "default"), (1, "kept")]
    glibc = allocator.glibc() is not None
    assert alloc["kept"]["default"] == glibc and alloc["default"]["default"] == (not glibc)
    assert all(0 <= r["kernel_share"] < 1 and r["peak_rss_mib"] > 0 for r in alloc.values())
    if glibc:  # each step's activations are mapped afresh by default, reused when kept
        assert alloc["kept"]["minor_faults"] < alloc["default"]["minor_faults"] / 4, alloc
    reached = info["time_to_quality"][0]["val_mean_ap_reached"]
    assert reached == {"0.539": {"minutes": 1.0, "epoch": 1}, "0.8": {"minutes": 2.0, "epoch": 2}}
