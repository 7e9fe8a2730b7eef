"""The allocator setting (allocator.py): freed memory kept for reuse where the C library is
glibc, applied first at start-up and recorded; elsewhere nothing changes."""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys

import pytest

import allocator
import part1_classify
import utils
from conftest import REPO, make_fashion_set

# A bare interpreter (no torch): its own peak is a few MiB, whatever started it.
PEAK = """import resource, sys
sys.path.insert(0, {repo!r})
import allocator
usage = resource.getrusage(resource.RUSAGE_SELF)
print(allocator.peak_rss_mib(usage), usage.ru_maxrss / 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's /proc and ru_maxrss")
def test_a_process_started_from_a_larger_one_reads_its_own_peak():
    """The benchmark's allocator probes (each a fresh process started by the far larger
    benchmark) report their own peak memory: Linux's ru_maxrss of such a process counts the
    parent's pages at the fork, /proc's VmHWM does not. That the probes' steps reuse freed
    memory instead of mapping it again is measured and checked by the benchmark's own test."""
    here = allocator.peak_rss_mib(resource.getrusage(resource.RUSAGE_SELF))
    proc = subprocess.run([sys.executable, "-c", PEAK.format(repo=str(REPO))],
                          capture_output=True, text=True, check=True)  # fmt: skip
    own, maxrss = map(float, proc.stdout.split())
    assert here > 300, here  # this process has imported torch: far larger than the probe
    assert maxrss > 0.9 * here, (maxrss, here)  # the reading the benchmark once used
    assert 1 < own < 100, own


def test_the_setting_is_applied_before_the_arguments_are_read(monkeypatch):
    """... and the run's freed memory goes back once its work is done, before the exit."""
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append("allocator"))
    monkeypatch.setattr(allocator, "release_once", calls.append)

    class Parser(argparse.ArgumentParser):
        def parse_args(self, argv=None):
            calls.append("arguments")
            return super().parse_args(argv)

    with pytest.raises(SystemExit) as done:
        utils.run_cli(lambda args: calls.append("main"), Parser(), [])
    assert done.value.code == 0 and calls == ["allocator", "arguments", "main", "exit"]


class StandInLibc:
    def __init__(self, answer: int):
        self.answer, self.calls = answer, []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.answer

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("trim", pad))
        return 1


def test_glibc_is_told_no_mmap_per_block_and_no_trim():
    libc = StandInLibc(1)
    said = allocator.keep_freed_memory(libc)
    assert libc.calls == [(allocator.M_MMAP_MAX, 0), (allocator.M_TRIM_THRESHOLD, 1 << 30)]
    assert said.startswith("allocator: glibc keeps freed memory for reuse")
    refused = allocator.keep_freed_memory(StandInLibc(0))
    assert refused == "allocator: glibc's defaults (mallopt refused the settings)"


def test_a_platform_without_glibc_runs_unchanged(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert allocator.glibc() is None
    assert allocator.keep_freed_memory() == "allocator: the C library's defaults (not glibc)"
    rt = utils.settled_runtime(device="cpu")  # the rest of the start-up is as before
    assert rt.settings.allocator == "allocator: the C library's defaults (not glibc)"


def test_training_gives_freed_memory_back_before_the_first_and_after_the_last_epoch(
    monkeypatch, tmp_path
):
    """malloc_trim(0) once per process before the first epoch (the data's decoding
    temporaries) and once after the last (the training steps' activations, before the test and
    the figures), none per step, phase or later run; a platform without glibc is not touched."""
    libc = StandInLibc(1)
    allocator.release_freed(libc)
    assert libc.calls == [("trim", 0)]
    monkeypatch.setattr(sys, "platform", "darwin")
    allocator.release_freed()  # no C library to call: nothing happens
    monkeypatch.undo()
    trims = []  # for each trim: had the first run saved its last epoch's checkpoint yet?
    last = tmp_path / "a" / "checkpoints" / "last.pt"
    monkeypatch.setattr(allocator, "release_freed", lambda: trims.append(last.exists()))
    allocator.release_once.cache_clear()  # as in a fresh process
    data = make_fashion_set(tmp_path / "fm", n_train=60, n_test=20)
    for run in ("a", "b"):  # two trainings in one process: one trim of each kind
        part1_classify.main(part1_classify.get_args_parser().parse_args(
            ["--data-root", str(data), "--no-download", "--epochs", "2", "--batch-size", "16",
             "--output-dir", str(tmp_path / run), "--no-progress"]))  # fmt: skip
    assert trims == [False, True]
