"""Throughput benchmark: this project's data path and loop against a naive pipeline, in one run.

    python benchmark.py                         # both parts, every precision this machine
                                                # computes natively, both memory formats
    python benchmark.py --parts 1 --compile     # also time torch.compile for Part 1
    python benchmark.py --amp-dtypes bf16       # also time bf16 where it is emulated (slow)
    python benchmark.py --synthetic 1           # random Part 1 data of the real shape

The naive pipelines are in naive.py. Ours: datasets.TensorLoader + engine.train_one_epoch /
engine.evaluate, in fp32 and each native AMP dtype, each in the standard layout and
channels-last. "default" marks, per part and phase, what the scripts run here without flags (the
hardware policy, hardware.py, for the reference model of each part); the summary says whether it
is the fastest variant measured. "% of peak" is against the measured matmul peak of the same
precision, shown only where the hardware computes that precision natively. For Part 2 also: mean
AP after the same short training in fp32 and each AMP dtype, the time of all 10 AP curves over the
110 test images, and the targets.

    python benchmark.py --parts 2 --profile     # + where a Part 2 training step spends its time
    python benchmark.py --parts 2 --quality RUN...   # + time to quality of finished Part 2 runs
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

import allocator
import datasets
import engine
import hardware
import losses
import naive
import optimizers
import quality
import runfiles
import timing
import utils
from benchmark_checks import (
    PART_MODELS,
    default_variants,
    fastest_check,
    format_fastest,
    format_targets,
    native_amp_dtypes,
    policy_flags,
    targets,
    variant_name,
)
from metrics import PixelScores
from models import build_model, forward_flops


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Images/s of training and evaluation: project pipeline vs naive pipeline."
    )
    p.add_argument("--parts", type=int, nargs="+", default=[1, 2], choices=[1, 2],
                   help="which parts (default: 1 2)")  # fmt: skip
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="default: auto (CUDA, MPS, CPU)")  # fmt: skip
    p.add_argument(
        "--amp-dtypes", nargs="+", default=None, choices=["bf16", "fp16"],
        help="AMP dtypes to time besides fp32 (default: those computed natively here: bf16 on "
        "CPUs with AVX512-BF16/AMX and GPUs of compute capability >= 8.0, fp16 on CUDA)",
    )  # fmt: skip
    p.add_argument("--compile", action="store_true", help="also time torch.compile variants")
    p.add_argument("--fashion-root", default="data/fashion-mnist", metavar="DIR",
                   help="Fashion-MNIST IDX folder (default: data/fashion-mnist)")  # fmt: skip
    p.add_argument("--facade-root", default="data/facade", metavar="DIR",
                   help="facade dataset folder (default: data/facade)")  # fmt: skip
    p.add_argument(
        "--synthetic", type=int, nargs="*", default=None, choices=[1, 2], metavar="PART",
        help="random uint8 data of the real shapes instead of the dataset, for the parts named "
        "(none named: both)",
    )  # fmt: skip
    p.add_argument(
        "--scale",
        type=float,
        default=None,
        metavar="X",
        help="multiply the number of timed steps (default: 1 on CPU, 10 on CUDA)",
    )
    p.add_argument(
        "--ap-steps", type=int, default=None, metavar="N",
        help="Part 2 training steps (batch 8) before the fp32-vs-AMP mean-AP check "
        "(default: 10 CPU, 100 CUDA)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads (default: torch's choice)")  # fmt: skip
    p.add_argument(
        "--profile", action="store_true",
        help="profile a Part 2 training step (facade_fcn, default flags): time per operator "
        "and input shape, i.e. per layer",
    )  # fmt: skip
    p.add_argument(
        "--quality", nargs="+", default=[], metavar="RUN",
        help="finished Part 2 run folders: wall minutes until the validation mean AP first "
        "reached the reference's 0.539 and 0.80 (from log.txt), and the final test mean AP",
    )  # fmt: skip
    p.add_argument("--output", default=None, metavar="JSON",
                   help="result file (default: outputs/benchmark/<device>.json)")  # fmt: skip
    return p


# ----------------------------------------------------------------------------- parts
def synthetic(args, part: int) -> bool:
    return args.synthetic is not None and (not args.synthetic or part in args.synthetic)


def load_part1(args):
    if synthetic(args, 1):
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (12000, 1, 28, 28), dtype=torch.uint8, generator=g)
        return images, torch.randint(0, 10, (12000,), generator=g)
    root = datasets.locate_fashion_mnist(Path(args.fashion_root), download=False)
    images, labels = datasets.load_fashion_split(root, "train")
    return images[:12000], labels[:12000]


def bench_part1(args, device: str, variants, scale: float, peaks: dict) -> list[dict]:
    images, labels = load_part1(args)
    mean, std = datasets.channel_stats(images)
    flops = forward_flops(build_model("sigmoid_cnn"), (1, 1, 28, 28))
    rt = timing.runtime(device, None, False)
    steps = max(4, int(8 * scale))
    naive_set = naive.NaiveFashion(images, labels, mean, std)
    train_loader = torch.utils.data.DataLoader(naive_set, batch_size=500, shuffle=True)
    eval_loader = torch.utils.data.DataLoader(naive_set, batch_size=2000)
    torch.manual_seed(0)
    net = build_model("sigmoid_cnn").to(rt.device)
    rows = [
        row("part1", "naive", "fp32", "train", timing.timed(lambda: naive.naive_train(
            net, train_loader, rt.device, steps, False), rt.device), flops * 3, peaks["fp32"]),
        row("part1", "naive", "fp32", "eval", timing.timed(lambda: naive.naive_eval(
            net, eval_loader, rt.device, 6), rt.device), flops, peaks["fp32"]),
    ]  # fmt: skip
    for amp, channels_last, compile_model, micro in variants:
        rt = timing.runtime(device, amp, channels_last, micro)
        on = images.to(rt.device), labels.to(rt.device)
        train_loader = datasets.TensorLoader(*on, 500, mean=mean, std=std, train=True)
        eval_batch = 2000 if rt.device.type == "cuda" else 500  # the script's default
        eval_loader = datasets.TensorLoader(*on, eval_batch, mean=mean, std=std, train=False)
        name = variant_name(amp, channels_last, compile_model, micro)
        peak = peaks.get(amp or "fp32")
        torch.manual_seed(0)
        rate = timing.ours_train(build_model("sigmoid_cnn"), train_loader, rt, steps, compile_model)
        rows.append(row("part1", "ours", name, "train", rate, flops * 3, peak))
        if micro:  # micro-batches are a training matter: its evaluation is the row without
            continue
        rate = timing.ours_eval(build_model("sigmoid_cnn"), eval_loader, rt, compile_model)
        rows.append(row("part1", "ours", name, "eval", rate, flops, peak))
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
    cuda = device == "cuda"  # main passes the device kind it picked
    batch, eval_batch, eval_count = (25, 10, 200) if cuda else (8, 1, 20)  # the scripts' batches
    train_steps = max(2, int(2 * scale))
    images, labels, test = load_part2(args, max(batch * (train_steps + 2), 40))
    mean, std = datasets.channel_stats(images)
    flops = forward_flops(build_model("facade_fcn"), (1, 3, 256, 256))
    rt = timing.runtime(device, None, False)
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(
        naive.NaiveFacade(images, labels, mean, std), batch_size=1, shuffle=True
    )
    net = build_model("facade_fcn").to(rt.device)
    rows = [
        row("part2", "naive", "fp32", "train", timing.timed(lambda: naive.naive_train(
            net, loader, rt.device, max(4, int(6 * scale)), True), rt.device), flops * 3,
            peaks["fp32"]),
        row("part2", "naive", "fp32", "eval", timing.timed(lambda: naive.naive_eval(
            net, loader, rt.device, max(6, int(10 * scale))), rt.device), flops, peaks["fp32"]),
    ]  # fmt: skip
    for amp, channels_last, compile_model, micro in variants:
        rt = timing.runtime(device, amp, channels_last, micro)
        on = images.to(rt.device), labels.to(rt.device)
        name = variant_name(amp, channels_last, compile_model, micro)
        peak = peaks.get(amp or "fp32")
        torch.manual_seed(0)
        train_loader = datasets.TensorLoader(*on, batch, mean=mean, std=std, train=True)
        rate = timing.ours_train(
            build_model("facade_fcn"), train_loader, rt, train_steps, compile_model
        )
        rows.append(row("part2", "ours", name, "train", rate, flops * 3, peak))
        if micro:  # micro-batches are a training matter: its evaluation is the row without
            continue
        eval_loader = datasets.TensorLoader(
            on[0][:eval_count], on[1][:eval_count], eval_batch, mean=mean, std=std, train=False
        )
        rate = timing.ours_eval(build_model("facade_fcn"), eval_loader, rt, compile_model)
        rows.append(row("part2", "ours", name, "eval", rate, flops, peak))
    ap = {}
    if test is not None:
        ap = ap_check(args, device, images, labels, test, mean, std, [v[0] for v in variants])
    return rows, ap


def ap_check(args, device, images, labels, test, mean, std, amps) -> dict:
    """Same init, same batches, same steps in fp32 and each AMP dtype timed; mean AP on test
    pixels."""
    cuda = device == "cuda"  # main passes the device kind it picked
    steps = args.ap_steps or (100 if cuda else 10)
    out = {"steps": steps, "batch": 8}
    for amp in dict.fromkeys(amps):  # fp32 first, each dtype once
        rt = timing.runtime(device, amp, False)
        torch.manual_seed(0)
        net, _ = utils.prepare_model(build_model("facade_fcn"), rt)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-5)
        sched = optimizers.build_scheduler(opt, "constant", steps)
        loader = datasets.TensorLoader(
            images.to(rt.device), labels.to(rt.device), 8, mean=mean, std=std, train=True
        )
        done = 0
        while done < steps:
            loader.set_epoch(done)
            trained = engine.train_one_epoch(
                net, loader, losses.CrossEntropy(), opt, sched, rt, 0, max_steps=steps - done
            )
            done += trained["images"] // 8
        test_loader = datasets.TensorLoader(
            test[0].to(rt.device), test[1].to(rt.device), 10, mean=mean, std=std, train=False
        )
        metric = PixelScores(5)
        result = engine.evaluate(net, test_loader, losses.CrossEntropy(), rt, metric)
        out[amp or "fp32"] = result["mean_ap"]
        if "ap_curves_s" not in out:  # all 10 curves again, alone: 5 classes, raw and softmax
            start = time.perf_counter()
            metric.compute()
            out["ap_curves_s"] = time.perf_counter() - start
    return out


def row(part, pipeline, precision, phase, rate, flops_per_image, peak) -> dict:
    """One table row; ``peak`` is None where the precision is not native (no % of peak)."""
    print(f"  {part} {pipeline:5s} {precision:14s} {phase:5s} {rate:10.1f} images/s", flush=True)
    return {
        "part": part,
        "pipeline": pipeline,
        "precision": precision,
        "phase": phase,
        "images_per_s": rate,
        "fraction_of_peak": None if peak is None else rate * flops_per_image / peak,
    }


# ----------------------------------------------------------------------------- main
def main(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    hw = hardware.read_hardware()
    kind, _ = hardware.pick_device(args.device, hw)
    device = torch.device(kind)
    scale = args.scale or (10 if kind == "cuda" else 1)
    native = native_amp_dtypes(kind, hw)
    amps = args.amp_dtypes if args.amp_dtypes is not None else native
    # A peak only for what is computed natively: emulated bf16 would take minutes to time.
    peaks = {"fp32": timing.matmul_peak(device, torch.float32)}
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    peaks |= {a: timing.matmul_peak(device, dtypes[a]) for a in amps if a in native}
    variants = [(a, cl, False, 0) for a in [None, *amps] for cl in (False, True)]
    if args.compile:
        variants += [(None, False, True, 0), (native[0] if native else None, True, True, 0)]
    defaults = default_variants(kind, hw)
    rows, ap = [], {}
    if 1 in args.parts:
        rows += bench_part1(args, kind, part_variants(variants, kind, hw, 1), scale, peaks)
    if 2 in args.parts:
        part2_variants = part_variants(variants, kind, hw, 2)
        part2_rows, ap = bench_part2(args, kind, part2_variants, scale, peaks)
        rows += part2_rows
    add_speedups(rows)
    for r in rows:
        r["default"] = (
            r["pipeline"] == "ours" and defaults[f"{r['part']}/{r['phase']}"] == (r["precision"])
        )
    part2 = policy_flags(kind, hw, PART_MODELS["part2"])
    part2_train = part2["amp"], part2["train_cl"]
    profile = profile_part2(args, kind, *part2_train) if args.profile else []
    kept = "kept" if allocator.glibc() else "default"  # what the scripts run with here
    allocators = [
        timing.allocator_variant(part, mode, kind, max(8, int(8 * scale)), torch.get_num_threads())
        | {"default": mode == kept}
        for part in args.parts
        for mode in timing.ALLOCATOR_MODES
    ]
    found_quality = [quality.time_to_quality(Path(run)) for run in args.quality]
    info = {
        "device": torch.cuda.get_device_name() if kind == "cuda" else (
            platform.processor() or platform.machine()),
        "cpu_isa": hardware.describe_cpu_isa(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "synthetic_parts": [p for p in (1, 2) if synthetic(args, p)],
        "peak_flops": peaks,
        "rows": rows,
        "part2_mean_ap_after_short_training": ap,
        "default_flags": defaults,
        "default_is_fastest": fastest_check(rows, defaults),
        "targets": targets(rows, ap, defaults),
        "profile_part2_train_step": profile,
        "allocator": allocators,
        "time_to_quality": found_quality,
    }  # fmt: skip
    print(f"{info['device']} ({info['cpu_isa']}, {info['threads']} threads)")
    print(format_table(rows))
    print(format_fastest(info["default_is_fastest"]))
    print(format_targets(info["targets"]))
    print(timing.format_allocator(allocators))
    if profile:
        print(timing.format_profile(profile))
    if found_quality:
        print(quality.format_quality(found_quality))
    print("peak matmul FLOP/s: " + ", ".join(f"{k} {v / 1e9:.0f} G" for k, v in peaks.items()))
    if ap:
        print(
            "Part 2 mean AP after the same short training: "
            + ", ".join(f"{k} {v}" for k, v in ap.items())
        )
    out = Path(args.output or f"outputs/benchmark/{kind}.json")
    runfiles.write_json(out, info)
    print(f"wrote {out}")
    return info


def part_variants(variants: list, kind: str, hw, part: int) -> list:
    """The variants timed for one part: those given, and the policy's training variant when it
    trains in micro-batches (it is the default there, so it must be measured)."""
    f = policy_flags(kind, hw, PART_MODELS[f"part{part}"])
    if not f["micro_batch"]:
        return variants
    return [*variants, (f["amp"], f["train_cl"], False, f["micro_batch"])]


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
    for r in rows:
        peak = "-" if r["fraction_of_peak"] is None else f"{100 * r['fraction_of_peak']:.1f}"
        lines.append(
            f"| {r['part']} | {r['pipeline']} | {r['precision']}{' (default)' * r['default']} "
            f"| {r['phase']} | {r['images_per_s']:.1f} | {r['speedup_vs_naive']:.2f} | {peak} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- profile
def profile_part2(
    args, device: str, amp: str | None, channels_last: bool, steps: int = 2
) -> list[dict]:
    """Where ``steps`` training steps of facade_fcn, batch 8, with the given flags spend their
    time (timing.profile_training_step)."""
    rt = timing.runtime(device, amp, channels_last)
    images, labels, _ = load_part2(args, 8 * (steps + 1))
    mean, std = datasets.channel_stats(images)
    loader = datasets.TensorLoader(
        images.to(rt.device), labels.to(rt.device), 8, mean=mean, std=std, train=True
    )
    return timing.profile_training_step(build_model("facade_fcn"), loader, rt, steps)


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser())
