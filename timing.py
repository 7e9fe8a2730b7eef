"""How benchmark.py times things: the machine's matmul peak, our training and evaluation loop
(the scripts' own engine.train_one_epoch / engine.evaluate), a per-layer profile of a training
step, and the allocator's variants, each in a fresh process."""

from __future__ import annotations

import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import allocator
import datasets
import engine
import losses
import models
import optimizers
import utils


def runtime(
    device: str, amp_dtype: str | None, channels_last: bool, micro_batch: int = 0
) -> utils.Runtime:
    """A variant's settings, given as flags to the policy every script goes through (the
    benchmark passes micro-batches only for models whose batches split exactly)."""
    amp = {"amp": amp_dtype is not None, "amp_dtype": amp_dtype}
    return utils.settled_runtime(device=device, **amp, channels_last=channels_last,
                                 micro_batch=micro_batch, progress=False)  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """FLOP/s of square matmuls for about ``seconds``: the practical ceiling for this dtype.
    Call it only for a dtype the hardware computes natively (emulated bf16 runs ~100x slower)."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    sync(device)
    reps, start = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < seconds:
        a @ b
        reps += 1
        if reps % 8 == 0:
            sync(device)
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    count = fn()
    sync(device)
    return count / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- our pipeline
def ours_train(model, loader, rt, steps: int, compile_model=False, profiler=None) -> float:
    """Images/s of ``steps`` training steps after a 2-step warm-up (and compile); the timed steps
    run inside ``profiler`` when one is given."""
    net, _ = utils.prepare_model(model, rt, compile_model=compile_model)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = optimizers.build_scheduler(opt, "constant", steps)
    loss_fn = losses.CrossEntropy()
    engine.train_one_epoch(net, loader, loss_fn, opt, sched, rt, 0, max_steps=2)  # warm-up, compile
    with profiler or contextlib.nullcontext():
        result = engine.train_one_epoch(net, loader, loss_fn, opt, sched, rt, 0, max_steps=steps)
    return result["images_per_s"]


def ours_eval(model, loader, rt, compile_model=False) -> float:
    net, _ = utils.prepare_model(model, rt, compile_model=compile_model)
    with torch.inference_mode(), rt.autocast():  # warm-up (and compile) on one batch
        net.eval()(rt.to_input(next(iter(loader))[0]))
    return engine.evaluate(net, loader, losses.CrossEntropy(), rt)["images_per_s"]


def profile_training_step(model, loader, rt, steps: int) -> list[dict]:
    """Self time per operator and input shape (so per layer) over ``steps`` training steps,
    timed as ``ours_train`` times them; the 15 largest."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if rt.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=activities, record_shapes=True)
    ours_train(model, loader, rt, steps, profiler=prof)
    attribute = "self_device_time_total" if rt.device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages(group_by_input_shape=True) if getattr(e, attribute)]
    total = sum(getattr(e, attribute) for e in events)
    events.sort(key=lambda e: getattr(e, attribute), reverse=True)
    return [
        {"op": e.key, "input_shapes": str(e.input_shapes)[:70], "calls": e.count,
         "ms_per_step": getattr(e, attribute) / 1e3 / steps,
         "share": getattr(e, attribute) / total}
        for e in events[:15]
    ]  # fmt: skip


def format_profile(profile: list[dict]) -> str:
    lines = [
        "Part 2 training step, facade_fcn, batch 8 (self time per operator and input shape):",
        "| op | input shapes | ms per step | share |",
        "|---|---|---:|---:|",
    ]
    lines += [
        f"| {p['op']} | {p['input_shapes']} | {p['ms_per_step']:.1f} | {100 * p['share']:.1f}% |"
        for p in profile
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- allocator
# The allocator is set once per process (allocator.py), so each variant runs in its own.
ALLOCATOR_MODES = {"default": "the C library's defaults", "kept": "freed memory kept (ours)"}
# part -> (reference model, training batch on the CPU, sample shape, classes)
PROBES = {1: ("sigmoid_cnn", 500, (1, 28, 28), 10), 2: ("facade_fcn", 8, (3, 256, 256), 5)}


def allocator_variant(part: int, mode: str, device: str, steps: int, threads: int) -> dict:
    """The part's reference model trained ``steps`` steps on random data of the real shape
    with the policy's settings, in a fresh process whose allocator is ``mode``: images/s, the
    kernel's share of the CPU time and the minor page faults of those steps, peak memory."""
    code = "import sys, timing; timing.print_allocator_probe(*sys.argv[1:])"
    args = [str(part), mode, device, str(steps), str(threads)]
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=Path(__file__).parent,
                          capture_output=True, text=True, check=True)  # fmt: skip
    return {"part": part, "allocator": mode} | json.loads(proc.stdout.splitlines()[-1])


class UsageWindow:
    """The process's CPU times and minor page faults over a ``with`` block (``ours_train``'s
    ``profiler``: the timed steps, after the warm-up)."""

    def __enter__(self):
        self.before = resource.getrusage(resource.RUSAGE_SELF)
        return self

    def __exit__(self, *exc):
        self.after = resource.getrusage(resource.RUSAGE_SELF)

    def record(self) -> dict:
        user = self.after.ru_utime - self.before.ru_utime
        kernel = self.after.ru_stime - self.before.ru_stime
        return {
            "kernel_share": kernel / max(user + kernel, 1e-9),
            "minor_faults": self.after.ru_minflt - self.before.ru_minflt,
            "peak_rss_mib": allocator.peak_rss_mib(self.after),
        }


def print_allocator_probe(part: str, mode: str, device: str, steps: str, threads: str) -> None:
    line = allocator.keep_freed_memory() if mode == "kept" else ALLOCATOR_MODES[mode]
    name, batch, shape, classes = PROBES[int(part)]
    rt = utils.settled_runtime(device=device, model=name, allocator=line, progress=False,
                               threads=int(threads))  # fmt: skip
    g = torch.Generator().manual_seed(0)
    count = batch * (int(steps) + 2)
    images = torch.randint(0, 256, (count, *shape), dtype=torch.uint8, generator=g)
    pixels = int(part) == 2  # a label per pixel (uint8, as the data loads) or per image
    label_shape, label_dtype = ((count, *shape[1:]), torch.uint8) if pixels else ((count,), None)
    labels = torch.randint(0, classes, label_shape, dtype=label_dtype, generator=g)
    mean, std = datasets.channel_stats(images)
    loader = datasets.TensorLoader(images.to(rt.device), labels.to(rt.device), batch,
                                   mean=mean, std=std, train=True)  # fmt: skip
    # The heap grows in ours_train's warm-up steps, outside the window, and now and then once
    # more by one activation (~10,000 faults) later on: enough steps that this is small.
    window = UsageWindow()
    rate = ours_train(models.build_model(name, num_classes=classes), loader, rt, int(steps),
                      profiler=window)  # fmt: skip
    print(json.dumps({"images_per_s": rate} | window.record()))


def format_allocator(rows: list[dict]) -> str:
    lines = [
        "Allocator (the reference models' training steps, each variant in a fresh process):",
        "| part | allocator | images/s | kernel share of CPU | minor faults | peak MiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['part']} | {ALLOCATOR_MODES[r['allocator']]}{' (default)' * r['default']} "
        f"| {r['images_per_s']:.1f} | {100 * r['kernel_share']:.1f}% | {r['minor_faults']:,} "
        f"| {r['peak_rss_mib']:.0f} |"
        for r in rows
    ]
    for part in dict.fromkeys(r["part"] for r in rows):
        ours = [r for r in rows if r["part"] == part]
        fastest = max(ours, key=lambda r: r["images_per_s"])
        if not fastest["default"]:
            lines.append(f"part {part}: the default allocator is not the fastest measured here")
    return "\n".join(lines)
