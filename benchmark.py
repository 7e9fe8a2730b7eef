"""Throughput benchmark: this project's data path and loop against a naive pipeline, in one run.

    python benchmark.py                         # both parts, fp32 and bf16 AMP, CPU or CUDA
    python benchmark.py --parts 1 --compile     # also time torch.compile for Part 1
    python benchmark.py --amp-dtypes bf16 fp16  # on CUDA
    python benchmark.py --synthetic 1           # random Part 1 data of the real shape
                                                # (no dataset needed)

Naive pipelines (written here, as a first implementation would be):
  Part 1: a torchvision-style Dataset (uint8 -> PIL -> ToTensor -> Normalize per sample) and a
  DataLoader.
  Part 2: batch size 1 with one-hot (5, H, W) int64 labels, fp32, for training and evaluation.
Ours: datasets.TensorLoader + engine.train_one_epoch / engine.evaluate, fp32 and --amp, with and
without channels-last; "default" marks what the scripts do on this machine without flags.
Also reports each rate as a fraction of this machine's measured matmul peak and, for Part 2, mean AP
after the same short training in fp32 and with AMP, the time of all 10 AP curves (5 classes, raw
and softmax) over the 110 test images, and against the issue's targets. Prints tables; writes JSON.

    python benchmark.py --parts 2 --profile     # + where a Part 2 training step spends its time
    python benchmark.py --parts 2 --quality RUN...   # + time to quality of finished Part 2 runs
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import re
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import augment
import datasets
import engine
import runfiles
import utils
from metrics import PixelScores
from models import build_model, forward_flops


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Images/s of training and evaluation: project pipeline vs naive pipeline."
    )
    p.add_argument(
        "--parts",
        type=int,
        nargs="+",
        default=[1, 2],
        choices=[1, 2],
        help="which parts (default: 1 2)",
    )
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto"
    )
    p.add_argument(
        "--amp-dtypes",
        nargs="+",
        default=None,
        choices=["bf16", "fp16"],
        help="AMP variants to time besides fp32 (default: bf16 on CPU, bf16 fp16 on CUDA)",
    )
    p.add_argument("--compile", action="store_true", help="also time torch.compile variants")
    p.add_argument(
        "--fashion-root",
        default="data/fashion-mnist",
        metavar="DIR",
        help="Fashion-MNIST IDX folder",
    )
    p.add_argument(
        "--facade-root", default="data/facade", metavar="DIR", help="facade dataset folder"
    )
    p.add_argument(
        "--synthetic",
        type=int,
        nargs="*",
        default=None,
        choices=[1, 2],
        metavar="PART",
        help="random uint8 data of the real shapes instead of the dataset, for the parts named "
        "(none named: both)",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=None,
        metavar="X",
        help="multiply the number of timed steps (default: 1 on CPU, 10 on CUDA)",
    )
    p.add_argument(
        "--ap-steps",
        type=int,
        default=None,
        metavar="N",
        help="Part 2 training steps (batch 8) before the fp32-vs-AMP mean-AP check "
        "(default: 10 CPU, 100 CUDA)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads (default: torch's choice)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="profile a Part 2 training step (facade_fcn, default flags): time per operator "
        "and input shape, i.e. per layer",
    )
    p.add_argument(
        "--quality",
        nargs="+",
        default=[],
        metavar="RUN",
        help="finished Part 2 run folders: wall minutes until the validation mean AP first "
        "reached the reference's 0.539 and 0.80 (from log.txt), and the final test mean AP",
    )
    p.add_argument(
        "--output",
        default=None,
        metavar="JSON",
        help="result file (default: outputs/benchmark/<device>.json)",
    )
    return p


def runtime(device: str, amp_dtype: str | None, channels_last: bool) -> utils.Runtime:
    return utils.setup_runtime(
        device=device,
        amp=amp_dtype is not None,
        amp_dtype=amp_dtype or "bf16",
        channels_last=channels_last,
        progress=False,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul: the machine's practical ceiling for this dtype."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (
        torch.randn(n, n, device=device, dtype=dtype),
        torch.randn(n, n, device=device, dtype=dtype),
    )
    for _ in range(2):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 3
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    count = fn()
    sync(device)
    return count / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- naive pipelines
class NaiveFashion(torch.utils.data.Dataset):
    """What torchvision's FashionMNIST + ToTensor + Normalize does: one PIL image per sample."""

    def __init__(self, images, labels, mean, std):
        from torchvision import transforms

        self.images, self.labels = images.numpy(), labels.numpy()
        self.transform = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize(mean, std)]
        )

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i, 0], mode="L")), int(self.labels[i])


class NaiveFacade(torch.utils.data.Dataset):
    """The reference's style: HWC float arrays normalised per sample, one-hot (C, H, W) int64
    labels."""

    def __init__(self, images, labels, mean, std):
        self.images = images.permute(0, 2, 3, 1).numpy()
        self.labels, self.mean, self.std = labels.numpy(), np.array(mean), np.array(std)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = (self.images[i] / 255.0 - self.mean) / self.std
        onehot = (np.arange(5)[:, None, None] == self.labels[i][None]).astype(np.int64)
        return torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32)), torch.from_numpy(onehot)


def naive_train(model, loader, device, steps: int, onehot: bool) -> int:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    seen = 0
    for step, (x, y) in enumerate(loader):
        if step >= steps:
            break
        x, y = x.to(device), y.to(device)
        if onehot:
            y = y.argmax(1)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(x)
    return seen


@torch.no_grad()
def naive_eval(model, loader, device, steps: int) -> int:
    model.eval()
    seen = 0
    for step, (x, _) in enumerate(loader):
        if step >= steps:
            break
        model(x.to(device)).cpu()
        seen += len(x)
    return seen


# ----------------------------------------------------------------------------- our pipeline
def ours_train(model, loader, rt, steps: int, compile_model=False, profiler=None) -> float:
    """Images/s of ``steps`` training steps after a 2-step warm-up (and compile); the timed steps
    run inside ``profiler`` when one is given."""
    net, _ = utils.prepare_model(model, rt, compile_model=compile_model)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = engine.build_scheduler(opt, "constant", steps)
    loss_fn = engine.CrossEntropy()
    engine.train_one_epoch(net, loader, loss_fn, opt, sched, rt, 0, max_steps=2)  # warm-up, compile
    with profiler or contextlib.nullcontext():
        result = engine.train_one_epoch(net, loader, loss_fn, opt, sched, rt, 0, max_steps=steps)
    return result["images_per_s"]


def ours_eval(model, loader, rt, compile_model=False) -> float:
    net, _ = utils.prepare_model(model, rt, compile_model=compile_model)
    with torch.inference_mode(), rt.autocast():  # warm-up (and compile) on one batch
        net.eval()(rt.to_input(next(iter(loader))[0]))
    return engine.evaluate(net, loader, engine.CrossEntropy(), rt)["images_per_s"]


# ----------------------------------------------------------------------------- parts
def synthetic(args, part: int) -> bool:
    return args.synthetic is not None and (not args.synthetic or part in args.synthetic)


def load_part1(args):
    if synthetic(args, 1):
        g = torch.Generator().manual_seed(0)
        return torch.randint(
            0, 256, (12000, 1, 28, 28), dtype=torch.uint8, generator=g
        ), torch.randint(0, 10, (12000,), generator=g)
    images, labels = datasets.load_fashion_split(
        datasets.locate_fashion_mnist(Path(args.fashion_root), download=False), "train"
    )
    return images[:12000], labels[:12000]


def bench_part1(args, device: str, variants, scale: float, peaks: dict) -> list[dict]:
    images, labels = load_part1(args)
    mean, std = datasets.channel_stats(images)
    flops = forward_flops(build_model("sigmoid_cnn"), (1, 1, 28, 28))
    rows = []
    rt = runtime(device, None, False)
    naive_loader = torch.utils.data.DataLoader(
        NaiveFashion(images, labels, mean, std), batch_size=500, shuffle=True
    )
    torch.manual_seed(0)
    steps = max(4, int(8 * scale))
    rate = timed(
        lambda: naive_train(
            build_model("sigmoid_cnn").to(rt.device), naive_loader, rt.device, steps, False
        ),
        rt.device,
    )
    rows.append(row("part1", "naive", "fp32", "train", rate, flops * 3, peaks["fp32"]))
    eval_loader = torch.utils.data.DataLoader(
        NaiveFashion(images, labels, mean, std), batch_size=2000
    )
    rate = timed(
        lambda: naive_eval(build_model("sigmoid_cnn").to(rt.device), eval_loader, rt.device, 6),
        rt.device,
    )
    rows.append(row("part1", "naive", "fp32", "eval", rate, flops, peaks["fp32"]))
    for amp, channels_last, compile_model in variants:
        rt = runtime(device, amp, channels_last)
        on = images.to(rt.device), labels.to(rt.device)
        train_loader = datasets.TensorLoader(
            *on, 500, mean=mean, std=std, train=True, augment=augment.random_translate_flip
        )
        eval_loader = datasets.TensorLoader(*on, 2000, mean=mean, std=std, train=False)
        name = variant_name(amp, channels_last, compile_model)
        torch.manual_seed(0)
        rate = ours_train(build_model("sigmoid_cnn"), train_loader, rt, steps, compile_model)
        rows.append(row("part1", "ours", name, "train", rate, flops * 3, peaks[amp or "fp32"]))
        rate = ours_eval(build_model("sigmoid_cnn"), eval_loader, rt, compile_model)
        rows.append(row("part1", "ours", name, "eval", rate, flops, peaks[amp or "fp32"]))
    return rows


def load_part2(args, count: int):
    if synthetic(args, 2):
        g = torch.Generator().manual_seed(0)
        return (
            torch.randint(0, 256, (count, 3, 256, 256), dtype=torch.uint8, generator=g),
            torch.randint(0, 5, (count, 256, 256), dtype=torch.uint8, generator=g),
            None,
        )
    root = Path(args.facade_root)
    images, labels = datasets.load_facade_split(root / "train", 0, count - 1)
    test = datasets.load_facade_split(root / "test_dev", 0, 109)  # the test split, for AP
    return images, labels, test


def bench_part2(args, device: str, variants, scale: float, peaks: dict) -> tuple[list[dict], dict]:
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    batch = 25 if cuda else 8
    train_steps = max(2, int(2 * scale))
    images, labels, test = load_part2(args, max(batch * (train_steps + 2), 40))
    mean, std = datasets.channel_stats(images)
    flops = forward_flops(build_model("facade_fcn"), (1, 3, 256, 256))
    rows = []
    rt = runtime(device, None, False)
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(
        NaiveFacade(images, labels, mean, std), batch_size=1, shuffle=True
    )
    rate = timed(
        lambda: naive_train(
            build_model("facade_fcn").to(rt.device), loader, rt.device, max(4, int(6 * scale)), True
        ),
        rt.device,
    )
    rows.append(row("part2", "naive", "fp32", "train", rate, flops * 3, peaks["fp32"]))
    rate = timed(
        lambda: naive_eval(
            build_model("facade_fcn").to(rt.device), loader, rt.device, max(6, int(10 * scale))
        ),
        rt.device,
    )
    rows.append(row("part2", "naive", "fp32", "eval", rate, flops, peaks["fp32"]))
    for amp, channels_last, compile_model in variants:
        rt = runtime(device, amp, channels_last)
        on = images.to(rt.device), labels.to(rt.device)
        name = variant_name(amp, channels_last, compile_model)
        torch.manual_seed(0)
        train_loader = datasets.TensorLoader(*on, batch, mean=mean, std=std, train=True)
        rate = ours_train(build_model("facade_fcn"), train_loader, rt, train_steps, compile_model)
        rows.append(row("part2", "ours", name, "train", rate, flops * 3, peaks[amp or "fp32"]))
        eval_count = 200 if cuda else 20
        eval_loader = datasets.TensorLoader(
            on[0][:eval_count],
            on[1][:eval_count],
            10 if cuda else 1,  # part2_segment.py's default --eval-batch-size
            mean=mean,
            std=std,
            train=False,
        )
        rate = ours_eval(build_model("facade_fcn"), eval_loader, rt, compile_model)
        rows.append(row("part2", "ours", name, "eval", rate, flops, peaks[amp or "fp32"]))
    ap = ap_check(args, device, images, labels, test, mean, std, cuda) if test is not None else {}
    return rows, ap


def ap_check(args, device, images, labels, test, mean, std, cuda) -> dict:
    """Same init, same batches, same steps in fp32 and each AMP dtype; mean AP on test pixels."""
    steps = args.ap_steps or (100 if cuda else 10)
    out = {"steps": steps, "batch": 8}
    for amp in [None] + [a for a in amp_dtypes(args, cuda)]:
        rt = runtime(device, amp, False)
        torch.manual_seed(0)
        net, _ = utils.prepare_model(build_model("facade_fcn"), rt)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-5)
        sched = engine.build_scheduler(opt, "constant", steps)
        loader = datasets.TensorLoader(
            images.to(rt.device), labels.to(rt.device), 8, mean=mean, std=std, train=True
        )
        done = 0
        while done < steps:
            loader.set_epoch(done)
            done += (
                engine.train_one_epoch(
                    net, loader, engine.CrossEntropy(), opt, sched, rt, 0, max_steps=steps - done
                )["images"]
                // 8
            )
        test_loader = datasets.TensorLoader(
            test[0].to(rt.device), test[1].to(rt.device), 10, mean=mean, std=std, train=False
        )
        metric = PixelScores(5)
        result = engine.evaluate(net, test_loader, engine.CrossEntropy(), rt, metric)
        out[amp or "fp32"] = result["mean_ap"]
        if "ap_curves_s" not in out:  # all 10 curves again, alone: 5 classes, raw and softmax
            start = time.perf_counter()
            metric.compute()
            out["ap_curves_s"] = time.perf_counter() - start
    return out


def row(part, pipeline, precision, phase, rate, flops_per_image, peak) -> dict:
    print(f"  {part} {pipeline:5s} {precision:14s} {phase:5s} {rate:10.1f} images/s", flush=True)
    return {
        "part": part,
        "pipeline": pipeline,
        "precision": precision,
        "phase": phase,
        "images_per_s": rate,
        "fraction_of_peak": rate * flops_per_image / peak,
    }


def variant_name(amp, channels_last, compile_model) -> str:
    return (
        (amp or "fp32") + ("+cl" if channels_last else "") + ("+compile" if compile_model else "")
    )


def amp_dtypes(args, cuda: bool) -> list[str]:
    return args.amp_dtypes or (["bf16", "fp16"] if cuda else ["bf16"])


def main(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    scale = args.scale or (10 if cuda else 1)
    peaks = {
        "fp32": matmul_peak(device, torch.float32),
        "bf16": matmul_peak(device, torch.bfloat16),
    }
    peaks["fp16"] = matmul_peak(device, torch.float16) if cuda else peaks["bf16"]
    variants = [(None, False, False)] + [(a, False, False) for a in amp_dtypes(args, cuda)]
    variants += [(a, True, False) for a in [None] + amp_dtypes(args, cuda)]
    if args.compile:
        variants += [(None, False, True), (amp_dtypes(args, cuda)[0], False, True)]
    # What part1_classify.py / part2_segment.py run without flags here: channels-last, and bf16
    # autocast where the hardware computes it natively.
    default = ("bf16" if utils.native_bf16(device) else None, True)  # amp dtype, channels-last
    default_variant = variant_name(*default, False)
    rows, ap = [], {}
    if 1 in args.parts:
        rows += bench_part1(args, args.device, variants, scale, peaks)
    if 2 in args.parts:
        part2_rows, ap = bench_part2(args, args.device, variants, scale, peaks)
        rows += part2_rows
    add_speedups(rows)
    for r in rows:
        r["default"] = r["pipeline"] == "ours" and r["precision"] == default_variant
    profile = profile_part2(args, args.device, *default) if args.profile else []
    quality = [time_to_quality(Path(run)) for run in args.quality]
    info = {
        "device": torch.cuda.get_device_name()
        if cuda
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "synthetic_parts": [p for p in (1, 2) if synthetic(args, p)],
        "peak_flops": peaks,
        "rows": rows,
        "part2_mean_ap_after_short_training": ap,
        "default_flags": default_variant,
        "targets": targets(rows, ap, default_variant),
        "profile_part2_train_step": profile,
        "time_to_quality": quality,
    }
    print(format_table(rows))
    print(format_targets(info["targets"]))
    if profile:
        print(format_profile(profile))
    if quality:
        print(format_quality(quality))
    print("peak matmul FLOP/s: " + ", ".join(f"{k} {v / 1e9:.0f} G" for k, v in peaks.items()))
    if ap:
        print(
            "Part 2 mean AP after the same short training: "
            + ", ".join(f"{k} {v}" for k, v in ap.items())
        )
    out = Path(args.output or f"outputs/benchmark/{'cuda' if cuda else 'cpu'}.json")
    runfiles.write_json(out, info)
    print(f"wrote {out}")
    return info


def add_speedups(rows: list[dict]) -> None:
    """Speed-up of every row over the naive fp32 pipeline of the same part and phase."""
    base = {(r["part"], r["phase"]): r["images_per_s"] for r in rows if r["pipeline"] == "naive"}
    for r in rows:
        r["speedup_vs_naive"] = r["images_per_s"] / base[(r["part"], r["phase"])]


def format_table(rows: list[dict]) -> str:
    lines = [
        "| part | pipeline | precision | phase | images/s | x naive | % of peak |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['part']} | {r['pipeline']} | {r['precision']}{' (default)' * r['default']} | "
        f"{r['phase']} | "
        f"{r['images_per_s']:.1f} | "
        f"{r['speedup_vs_naive']:.2f} | {100 * r['fraction_of_peak']:.1f} |"
        for r in rows
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- targets
def targets(rows: list[dict], ap: dict, default_variant: str) -> list[dict]:
    """The Part 2 targets: faithful training with the default flags (``default_variant``) >= 3x
    naive, the fp32 path (--no-amp, channels-last) >= 1.5x, evaluation with the default flags
    >= 4x, all 10 AP curves of the test split <= 5 s."""
    speedup = {
        (r["phase"], r["precision"]): r["speedup_vs_naive"]
        for r in rows
        if r["part"] == "part2" and r["pipeline"] == "ours"
    }
    train, evaluation = ("train", default_variant), ("eval", default_variant)
    fp32_train = ("train", "fp32+cl")  # --no-amp keeps the default channels-last
    found = [
        ("Part 2 training, default flags (x naive)", speedup.get(train), 3.0, "min"),
        ("Part 2 training, fp32 path --no-amp (x naive)", speedup.get(fp32_train), 1.5, "min"),
        ("Part 2 evaluation, default flags (x naive)", speedup.get(evaluation), 4.0, "min"),
        ("all 10 AP curves, 110 test images (s)", ap.get("ap_curves_s"), 5.0, "max"),
    ]
    return [
        {"what": what, "value": value, "target": target, "met": None if value is None
         else (value >= target if kind == "min" else value <= target)}
        for what, value, target, kind in found
    ]  # fmt: skip


def format_targets(found: list[dict]) -> str:
    lines = ["| target | measured | goal | met |", "|---|---:|---:|---|"]
    for t in found:
        value = "not measured" if t["value"] is None else f"{t['value']:.2f}"
        goal = ("<= " if "(s)" in t["what"] else ">= ") + f"{t['target']:g}"
        met = {True: "yes", False: "no", None: "-"}[t["met"]]
        lines.append(f"| {t['what']} | {value} | {goal} | {met} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- profile
def profile_part2(
    args, device: str, amp: str | None, channels_last: bool, steps: int = 2
) -> list[dict]:
    """Self time per operator and input shape (so per layer) over ``steps`` training steps of
    facade_fcn, batch 8, with the given flags, timed as ``ours_train`` times them."""
    rt = runtime(device, amp, channels_last)
    images, labels, _ = load_part2(args, 8 * (steps + 1))
    mean, std = datasets.channel_stats(images)
    loader = datasets.TensorLoader(
        images.to(rt.device), labels.to(rt.device), 8, mean=mean, std=std, train=True
    )
    activities = [torch.profiler.ProfilerActivity.CPU]
    if rt.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=activities, record_shapes=True)
    ours_train(build_model("facade_fcn"), loader, rt, steps, profiler=prof)
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


# ----------------------------------------------------------------------------- time to quality
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


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser())
