"""The allocator setting (allocator.py): freed memory kept for reuse where the C library is
glibc, applied first at start-up and recorded; elsewhere nothing changes."""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys

import pytest
import torch

import allocator
import part1_classify
import timing
import utils
from conftest import REPO, make_fashion_set

STEPS = """import resource, sys, torch
sys.path.insert(0, {repo!r})
import allocator, models, timing
torch.set_num_threads(1)
if sys.argv[1] == "kept":
    allocator.keep_freed_memory()
torch.manual_seed(0)
net = models.build_model("sigmoid_cnn", num_classes=10)
opt = torch.optim.Adam(net.parameters())
x, y = torch.randn(500, 1, 28, 28), torch.randint(0, 10, (500,))

def step():  # Part 1's training step in fp32, at its batch of 500
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()

for _ in range(2):  # the first steps grow the heap either way
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
usage = resource.getrusage(resource.RUSAGE_SELF)
print(usage.ru_minflt - before, timing.peak_rss_mib(usage))
"""


@pytest.mark.skipif(allocator.glibc() is None, reason="the C library is not glibc")
def test_training_steps_reuse_freed_memory_instead_of_mapping_it_again():
    """Page faults of four training steps: by default glibc maps each large activation afresh
    and the kernel zeroes its pages (about 75,000 faults a step here); with freed memory kept,
    the steps reuse the same pages. Each process reports its own peak memory although this
    one is larger when it starts them (Linux's ru_maxrss would report this one's)."""
    ballast = torch.ones(512 * 2**20)  # 2 GiB resident here while the probes start
    here = timing.peak_rss_mib(resource.getrusage(resource.RUSAGE_SELF))
    faults, peaks = {}, {}
    for mode in ("default", "kept"):
        proc = subprocess.run([sys.executable, "-c", STEPS.format(repo=str(REPO)), mode],
                              capture_output=True, text=True, check=True)  # fmt: skip
        count, peak = proc.stdout.split()[-2:]
        faults[mode], peaks[mode] = int(count), float(peak)
    del ballast
    assert faults["default"] > 4 * 20_000, faults
    assert faults["kept"] < faults["default"] / 10, faults
    assert 100 < max(peaks.values()) < here - 1024, (peaks, here)


def test_the_setting_is_applied_before_the_arguments_are_read(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append("allocator"))

    class Parser(argparse.ArgumentParser):
        def parse_args(self, argv=None):
            calls.append("arguments")
            return super().parse_args(argv)

    with pytest.raises(SystemExit) as done:
        utils.run_cli(lambda args: calls.append("main"), Parser(), [])
    assert done.value.code == 0 and calls == ["allocator", "arguments", "main"]


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


def test_training_starts_with_the_start_ups_freed_memory_given_back(monkeypatch, tmp_path):
    """malloc_trim(0) once per process, before the first epoch (the data's decoding
    temporaries), none per step, phase or later run; a platform without glibc is not touched."""
    libc = StandInLibc(1)
    allocator.release_freed(libc)
    assert libc.calls == [("trim", 0)]
    monkeypatch.setattr(sys, "platform", "darwin")
    allocator.release_freed()  # no C library to call: nothing happens
    monkeypatch.undo()
    trims = []
    monkeypatch.setattr(allocator, "release_freed", lambda: trims.append(len(trims)))
    allocator.release_start_up_memory.cache_clear()  # as in a fresh process
    data = make_fashion_set(tmp_path / "fm", n_train=60, n_test=20)
    for run in ("a", "b"):  # two trainings in one process: one trim
        part1_classify.main(part1_classify.get_args_parser().parse_args(
            ["--data-root", str(data), "--no-download", "--epochs", "2", "--batch-size", "16",
             "--output-dir", str(tmp_path / run), "--no-progress"]))  # fmt: skip
    assert trims == [0]
