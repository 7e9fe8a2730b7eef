"""Shared machinery for both parts: runtime (device, AMP, DDP), the one training loop,
metrics, checkpoints, atomic file writing, plots and the HTML report.

Nothing here knows about Fashion-MNIST or facades; the scripts pass in a model, loaders,
a loss and a metric object with ``reset() / update(logits, target) / all_reduce(rt) / compute()``.
"""
from __future__ import annotations

import base64
import contextlib
import csv
import html
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm


# ----------------------------------------------------------------------------- errors / CLI
class UserError(Exception):
    """Bad input (missing folder, corrupt file, wrong flag): shown as one line, exit code 2."""


def run_cli(main: Callable, argv_parser, argv=None) -> None:
    """Parse arguments and run ``main``; user errors become one line on stderr and exit 2."""
    args = argv_parser.parse_args(argv)
    try:
        main(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last completed epoch is in checkpoints/last.pt (--resume it)", file=sys.stderr)
        sys.exit(130)


def add_common_args(parser, *, epochs: int, batch_size: int, lr: float, weight_decay: float,
                    eval_batch_size: int, model: str, models: Iterable[str], output_root: str) -> None:
    """Flags shared by both scripts (training, runtime, outputs)."""
    g = parser.add_argument_group("training")
    g.add_argument("--model", default=model, choices=sorted(models), help=f"network to train (default: {model})")
    g.add_argument("--epochs", type=int, default=epochs, metavar="N", help=f"epochs to train (default: {_default(epochs)})")
    g.add_argument("--batch-size", type=int, default=batch_size, metavar="N",
                   help=f"training batch size per process; global batch = N x processes (default: {_default(batch_size)})")
    g.add_argument("--eval-batch-size", type=int, default=eval_batch_size, metavar="N",
                   help=f"batch size for validation/test (default: {eval_batch_size})")
    g.add_argument("--lr", type=float, default=lr, metavar="LR", help=f"peak learning rate (default: {_default(lr)})")
    g.add_argument("--weight-decay", type=float, default=weight_decay, metavar="WD",
                   help=f"weight decay (default: {_default(weight_decay)})")
    g.add_argument("--seed", type=int, default=0, help="random seed for split, init, shuffling, augmentation (default: 0)")
    g.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="stop each epoch after N steps (smoke tests; default: full epochs)")
    g.add_argument("--stop-after-epochs", type=int, default=None, metavar="N",
                   help="end this invocation after N epochs, keeping the schedule of --epochs "
                        "(time-boxed jobs; continue with --resume)")
    g.add_argument("--time-limit", type=float, default=None, metavar="MIN",
                   help="stop training after the epoch that passes MIN minutes, then test the best checkpoint")
    r = parser.add_argument_group("runtime")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto = CUDA when available, else CPU (default: auto)")
    r.add_argument("--amp", action="store_true", help="mixed precision (autocast) for forward and loss")
    r.add_argument("--amp-dtype", default="bf16", choices=["bf16", "fp16"],
                   help="autocast dtype; fp16 needs CUDA and uses a gradient scaler (default: bf16)")
    r.add_argument("--channels-last", action="store_true", help="channels-last memory format for model and inputs")
    r.add_argument("--compile", action="store_true", help="torch.compile the model (first epoch pays the compile time)")
    r.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for PyTorch (default: torch's choice)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    o = parser.add_argument_group("outputs")
    o.add_argument("--output-dir", default=None, metavar="DIR",
                   help=f"run folder (default: a new {output_root}/<time>-<model>; with --resume/--eval-only, "
                        "the checkpoint's run folder)")
    o.add_argument("--resume", default=None, metavar="CKPT", help="continue training from a checkpoint (e.g. RUN/checkpoints/last.pt)")
    o.add_argument("--eval-only", default=None, metavar="CKPT", help="evaluate a checkpoint on the test set and write results, no training")
    o.add_argument("--report-only", default=None, metavar="RUN_DIR", help="rebuild figures and report.html of a finished run folder")


def _default(value) -> str:
    return "per model" if value is None else f"{value:g}"


def resolve_output_dir(args, output_root: str) -> Path:
    if args.output_dir:
        return Path(args.output_dir)
    ckpt = args.resume or args.eval_only
    if ckpt:
        return Path(ckpt).resolve().parent.parent
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(output_root) / f"{stamp}-{args.model}"


# ----------------------------------------------------------------------------- runtime
@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    channels_last: bool = False
    progress: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        # One code path: a disabled autocast is a no-op, so fp32 and AMP share every line.
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                              enabled=self.amp_dtype is not None)

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


def setup_runtime(args) -> Runtime:
    """Pick the device, start DDP when launched by torchrun (RANK in env), set up AMP."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda_ok = torch.cuda.is_available()
    if args.device == "cuda" and not cuda_ok:
        raise UserError("--device cuda was given but CUDA is not available on this machine (use --device cpu or auto)")
    use_cuda = cuda_ok and args.device != "cpu"
    rank, local_rank, world_size = 0, 0, 1
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    amp_dtype = None
    if args.amp:
        if args.amp_dtype == "fp16" and not use_cuda:
            raise UserError("--amp-dtype fp16 needs CUDA; use the default bf16 on the CPU")
        amp_dtype = torch.float16 if args.amp_dtype == "fp16" else torch.bfloat16
    # The scaler only does something for fp16; for bf16/fp32 it is a pass-through.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    if use_cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device=device, rank=rank, local_rank=local_rank, world_size=world_size,
                   amp_dtype=amp_dtype, scaler=scaler, channels_last=args.channels_last,
                   progress=not getattr(args, "no_progress", False))


def cleanup_runtime(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prepare_model(model: torch.nn.Module, rt: Runtime, compile_model: bool = False):
    """Move to device; returns (model to train, unwrapped model for checkpoints)."""
    model = model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model_without_ddp = model
    if compile_model:
        model = torch.compile(model)
    if rt.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
    return model, model_without_ddp


def all_reduce_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of all ranks (shards may differ in length)."""
    if not rt.distributed:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(rt.world_size)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    chunks = [torch.empty_like(padded) for _ in range(rt.world_size)]
    dist.all_gather(chunks, padded)
    return torch.cat([c[: int(s.item())] for c, s in zip(chunks, sizes)])


def gather_in_dataset_order(local: torch.Tensor, n: int, rt: Runtime) -> torch.Tensor:
    """Undo the evaluation sharding (rank r holds samples r, r+W, ...): full tensor in dataset order."""
    gathered = all_gather_cat(local, rt)
    if not rt.distributed:
        return gathered
    order = torch.cat([torch.arange(r, n, rt.world_size) for r in range(rt.world_size)]).to(gathered.device)
    out = torch.empty_like(gathered)
    out[order] = gathered
    return out


def start_run(args, rt: Runtime, output_root: str) -> tuple[Path, logging.Logger]:
    """Create the run folder, its log and args.json (rank 0 only; other ranks get a silent logger)."""
    run_dir = resolve_output_dir(args, output_root)
    if rt.distributed:  # every rank must agree on a default folder name made from the clock
        names = [None] * rt.world_size
        dist.all_gather_object(names, str(run_dir))
        run_dir = Path(names[0])
    log = get_logger(run_dir if rt.is_main else None, rt.is_main)
    if rt.is_main:
        write_json(run_dir / "args.json", {**vars(args), "environment": environment_info(rt)})
        log.info("run folder: %s", run_dir)
        log.info("device %s, %d process(es), global batch %d, amp %s", rt.device, rt.world_size,
                 args.batch_size * rt.world_size, rt.amp_dtype)
    return run_dir, log


# ----------------------------------------------------------------------------- optimisation
def build_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float):
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise ValueError(name)


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int) -> float:
    """Multiplier of the peak LR at an optimiser step: linear warm-up, then constant or cosine to 0."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(schedule)


def build_scheduler(optimizer, schedule: str, total_steps: int, warmup_steps: int = 0):
    """A per-step LambdaLR: its state is only the step count, so resume needs nothing else."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, schedule, warmup_steps))


# ----------------------------------------------------------------------------- metrics
class ConfusionMatrix:
    """Counts (target, prediction) pairs with one bincount; targets >= num_classes are ignored."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.matrix = None

    def reset(self):
        self.matrix = None

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        n = self.num_classes
        pred = logits.argmax(1).flatten()
        target = target.flatten().long()
        valid = target < n
        counts = torch.bincount(n * target[valid] + pred[valid], minlength=n * n).reshape(n, n)
        self.matrix = counts if self.matrix is None else self.matrix + counts

    def all_reduce(self, rt: Runtime) -> None:
        if self.matrix is None:
            self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long, device=rt.device)
        all_reduce_sum(self.matrix, rt)

    def compute(self) -> dict:
        m = self.matrix.double().cpu()
        total, diag = m.sum(), m.diag()
        per_class_acc = diag / m.sum(1).clamp(min=1)
        iou = diag / (m.sum(0) + m.sum(1) - diag).clamp(min=1)
        return {
            "accuracy": (diag.sum() / total.clamp(min=1)).item(),
            "per_class_accuracy": per_class_acc.tolist(),
            "mean_per_class_accuracy": per_class_acc.mean().item(),
            "iou": iou.tolist(),
            "miou": iou.mean().item(),
            "confusion_matrix": self.matrix.cpu().tolist(),
        }


def precision_recall_steps(y_true, scores) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(precision, recall) at every distinct score threshold, highest first, in float64, exactly as
    sklearn's precision_recall_curve (before its reversal); None when there is no positive."""
    scores = torch.as_tensor(scores)
    y_true = torch.as_tensor(y_true, dtype=torch.bool)
    sorted_scores, order = torch.sort(scores, descending=True)
    hits = y_true[order].to(torch.float64)
    # Last index of each run of equal scores: ties share one threshold, as in sklearn.
    last_of_run = torch.nonzero(sorted_scores[1:] != sorted_scores[:-1]).flatten()
    last_of_run = torch.cat([last_of_run, torch.tensor([len(sorted_scores) - 1])])
    tps = torch.cumsum(hits, 0)[last_of_run]
    if len(tps) == 0 or tps[-1] == 0:
        return None
    return tps / (last_of_run + 1).to(torch.float64), tps / tps[-1]


def average_precision(y_true, scores) -> float:
    """Exactly sklearn.metrics.average_precision_score for one binary problem:
    AP = sum_n (R_n - R_{n-1}) P_n over distinct thresholds. One torch sort instead of sklearn's
    extra passes makes it several times faster for millions of pixels. nan when there is no positive."""
    return ap_from_steps(precision_recall_steps(y_true, scores))


def ap_from_steps(steps) -> float:
    if steps is None:
        return float("nan")
    precision, recall = steps
    return float((torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64)) * precision).sum())


def subsample_curve(precision: torch.Tensor, recall: torch.Tensor, points: int = 200) -> dict:
    keep = torch.linspace(0, len(recall) - 1, min(points, len(recall))).long()
    return {"recall": recall[keep].tolist(), "precision": precision[keep].tolist()}


class PixelScores:
    """Keeps every pixel's class scores (float32) and label for exact AP at the end, plus a
    confusion matrix. Memory: 4 bytes x classes x pixels (144 MB for 110 facades)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.confusion = ConfusionMatrix(num_classes)
        self.reset()

    def reset(self):
        self.scores, self.labels = [], []
        self.confusion.reset()

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.confusion.update(logits, target)
        self.scores.append(logits.float().permute(0, 2, 3, 1).reshape(-1, self.num_classes).cpu())
        self.labels.append(target.reshape(-1).to(torch.uint8).cpu())

    def all_reduce(self, rt: Runtime) -> None:
        self.confusion.all_reduce(rt)
        c = self.num_classes
        scores = torch.cat(self.scores) if self.scores else torch.zeros(0, c)
        labels = torch.cat(self.labels) if self.labels else torch.zeros(0, dtype=torch.uint8)
        if rt.distributed:  # gloo gathers CPU tensors; nccl needs them on the GPU
            scores = all_gather_cat(scores.to(rt.device), rt).cpu()
            labels = all_gather_cat(labels.to(rt.device), rt).cpu()
        self.scores, self.labels = [scores], [labels]

    def compute(self) -> dict:
        scores, labels = torch.cat(self.scores), torch.cat(self.labels).long()
        valid = labels < self.num_classes
        scores, labels = scores[valid], labels[valid]
        probs = torch.softmax(scores, dim=1)
        ap, curves = [], []
        for c in range(self.num_classes):
            steps = precision_recall_steps(labels == c, scores[:, c])
            ap.append(ap_from_steps(steps))
            curves.append(None if steps is None else subsample_curve(*steps))
        ap_softmax = [average_precision(labels == c, probs[:, c]) for c in range(self.num_classes)]
        cm = self.confusion.compute()
        return {"ap": ap, "pr_curves": curves, "mean_ap": float(np.nanmean(ap)), "ap_softmax": ap_softmax,
                "mean_ap_softmax": float(np.nanmean(ap_softmax)), "pixel_accuracy": cm["accuracy"],
                "iou": cm["iou"], "miou": cm["miou"], "per_class_accuracy": cm["per_class_accuracy"],
                "confusion_matrix": cm["confusion_matrix"]}


# ----------------------------------------------------------------------------- the loop
def train_one_epoch(model, loader, loss_fn, optimizer, rt: Runtime, epoch: int, scheduler=None,
                    max_steps: int | None = None, metric=None, log_interval: int = 10) -> dict:
    model.train()
    if metric is not None:
        metric.reset()
    loss_sum = torch.zeros((), device=rt.device)
    seen = 0
    steps = len(loader) if max_steps is None else min(len(loader), max_steps)
    bar = tqdm(total=steps, desc=f"epoch {epoch} train", leave=False, disable=not (rt.is_main and rt.progress),
               dynamic_ncols=True)
    start = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        if step >= steps:
            break
        x, y = rt.to_input(x), y.to(rt.device, non_blocking=True)
        with rt.autocast():
            logits = model(x)
            loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        rt.scaler.scale(loss).backward()
        rt.scaler.step(optimizer)
        rt.scaler.update()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach().float() * x.shape[0]
        seen += x.shape[0]
        if metric is not None:
            metric.update(logits.detach().float(), y)
        bar.update(1)
        if step % log_interval == 0 and bar.n:  # .item() syncs the device: only every few steps
            rate = seen * rt.world_size / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.0f}")
    bar.close()
    return summarize_pass(loss_sum, seen, start, metric, rt)


def summarize_pass(loss_sum: torch.Tensor, seen: int, start: float, metric, rt: Runtime) -> dict:
    """Mean loss, image count and rate over all ranks (one all-reduce), plus the metric's results."""
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    totals = all_reduce_sum(torch.stack([loss_sum.double(), torch.tensor(float(seen), device=rt.device, dtype=torch.float64)]), rt)
    result = {"loss": (totals[0] / totals[1].clamp(min=1)).item(), "images": int(totals[1].item()),
              "time_s": elapsed, "images_per_s": totals[1].item() / max(elapsed, 1e-9)}
    if metric is not None:
        metric.all_reduce(rt)
        result.update(metric.compute())
    return result


@torch.inference_mode()
def evaluate(model, loader, loss_fn, rt: Runtime, metric=None, desc: str = "eval", on_batch=None) -> dict:
    """Exact averages over every sample of the (sharded) loader; ``on_batch(x, y, logits)`` sees each batch."""
    model.eval()
    if metric is not None:
        metric.reset()
    loss_sum = torch.zeros((), device=rt.device, dtype=torch.float64)
    seen = 0
    start = time.perf_counter()
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not (rt.is_main and rt.progress), dynamic_ncols=True):
        x, y = rt.to_input(x), y.to(rt.device, non_blocking=True)
        with rt.autocast():
            logits = model(x)
        logits = logits.float()
        loss_sum += loss_fn(logits, y).double() * x.shape[0]
        seen += x.shape[0]
        if metric is not None:
            metric.update(logits, y)
        if on_batch is not None:
            on_batch(x, y, logits)
    return summarize_pass(loss_sum, seen, start, metric, rt)


@dataclass
class TrainState:
    """Everything the epoch loop needs besides the data; built once by a script."""
    model: torch.nn.Module
    model_without_ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: Callable
    extra: dict  # saved into every checkpoint (model_name, args, normalization, class_names, ...)
    start_epoch: int = 1
    best_value: float | None = None
    best_epoch: int | None = None
    best_weights: dict | None = None  # CPU copy kept on every rank, so no rank has to read rank 0's file


def fit(state: TrainState, train_loader, val_loader, rt: Runtime, run_dir: Path, *, epochs: int,
        best_key: str, best_mode: str, make_metric: Callable | None = None, max_steps: int | None = None,
        stop_after_epochs: int | None = None, time_limit_min: float | None = None,
        log: logging.Logger) -> list[dict]:
    """The epoch loop shared by both parts: train, validate, log a CSV row, save last/best checkpoints."""
    csv_path = run_dir / "metrics.csv"
    rows = [r for r in read_csv(csv_path) if int(r["epoch"]) < state.start_epoch] if rt.is_main else []
    last_epoch = epochs if stop_after_epochs is None else min(epochs, state.start_epoch - 1 + stop_after_epochs)
    started = time.perf_counter()
    for epoch in range(state.start_epoch, last_epoch + 1):
        train_loader.set_epoch(epoch)
        lr = state.optimizer.param_groups[0]["lr"]
        train = train_one_epoch(state.model, train_loader, state.loss_fn, state.optimizer, rt, epoch,
                                scheduler=state.scheduler, max_steps=max_steps,
                                metric=make_metric() if make_metric else None)
        val = evaluate(state.model, val_loader, state.loss_fn, rt, make_metric() if make_metric else None,
                       desc=f"epoch {epoch} val")
        row = {"epoch": epoch, "lr": lr, "train_loss": train["loss"], "val_loss": val["loss"]}
        if "accuracy" in train:
            row.update(train_accuracy=train["accuracy"], val_accuracy=val["accuracy"])
        row.update(epoch_time_s=train["time_s"] + val["time_s"], train_images_per_s=train["images_per_s"])
        value = row[best_key]
        if val["images"] == 0:  # no validation set: the last epoch is the one to keep
            row.update({k: float("nan") for k in row if k.startswith("val_")})
            improved = True
        else:
            improved = state.best_value is None or (value > state.best_value if best_mode == "max" else value < state.best_value)
        if improved:
            state.best_value, state.best_epoch = value, epoch
            state.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in state.model_without_ddp.state_dict().items()}
        if rt.is_main:
            rows.append(row)
            write_csv(csv_path, rows)
            log.info("epoch %d/%d  " + "  ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "epoch"), epoch, epochs)
            ckpt = {**state.extra, "model": state.model_without_ddp.state_dict(), "optimizer": state.optimizer.state_dict(),
                    "scheduler": state.scheduler.state_dict(), "scaler": rt.scaler.state_dict(), "epoch": epoch,
                    "best_value": state.best_value, "best_key": best_key, "rng": get_rng_state(), "metrics": row}
            save_checkpoint(ckpt, run_dir / "checkpoints" / "last.pt")
            if improved:
                save_checkpoint(ckpt, run_dir / "checkpoints" / "best.pt")
        if time_limit_min is not None and time.perf_counter() - started > 60 * time_limit_min and epoch < last_epoch:
            log.info("time limit of %g min reached after epoch %d of %d", time_limit_min, epoch, epochs)
            break
    return rows


def run_task(args, task: str, apply_recipe: Callable, run: Callable):
    """The scripts' main(): the checkpoint of --resume/--eval-only decides the model, the recipe fills
    unset flags, then ``run(args, rt, ckpt)`` runs inside a runtime that is always cleaned up."""
    ckpt_path = args.resume or args.eval_only
    ckpt = load_checkpoint(ckpt_path, task=task) if ckpt_path else None
    if ckpt is not None:
        args.model = ckpt["model_name"]
    apply_recipe(args, ckpt)
    rt = setup_runtime(args)
    try:
        return run(args, rt, ckpt)
    finally:
        cleanup_runtime(rt)


def build_train_state(model, model_without_ddp, args, train_loader, loss_fn, extra: dict) -> TrainState:
    """Optimiser and per-step schedule from the (recipe-filled) args."""
    optimizer = build_optimizer(model_without_ddp, args.optimizer, args.lr, args.weight_decay)
    steps_per_epoch = len(train_loader) if args.max_steps is None else min(len(train_loader), args.max_steps)
    scheduler = build_scheduler(optimizer, args.schedule, args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch))
    return TrainState(model, model_without_ddp, optimizer, scheduler, loss_fn, extra)


def train_or_load(state: TrainState, args, ckpt: dict | None, rt: Runtime, run_dir: Path, train_loader, val_loader, *,
                  best_key: str, best_mode: str, make_metric: Callable, log: logging.Logger) -> tuple[Path, int]:
    """--eval-only: the checkpoint's weights. Otherwise (resume and) train, then the best epoch's weights.
    Returns the checkpoint the test numbers will come from and its epoch."""
    if args.eval_only:
        state.model_without_ddp.load_state_dict(ckpt["model"])
        return Path(args.eval_only), ckpt["epoch"]
    if args.resume:
        restore_training(state, ckpt, rt)
        log.info("resumed from %s at epoch %d", args.resume, ckpt["epoch"])
    fit(state, train_loader, val_loader, rt, run_dir, epochs=args.epochs, best_key=best_key, best_mode=best_mode,
        make_metric=make_metric, max_steps=args.max_steps, stop_after_epochs=args.stop_after_epochs,
        time_limit_min=args.time_limit, log=log)
    return load_best_weights(state, run_dir, rt)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def restore_training(state: TrainState, ckpt: dict, rt: Runtime) -> None:
    """Load model/optimizer/scheduler/scaler/RNG from a checkpoint made by ``fit``."""
    state.model_without_ddp.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    rt.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    state.start_epoch = ckpt["epoch"] + 1
    state.best_value = ckpt.get("best_value")


def load_best_weights(state: TrainState, run_dir: Path, rt: Runtime) -> tuple[Path, int]:
    """Put the best epoch's weights into the model; returns (checkpoint path, epoch)."""
    path = run_dir / "checkpoints" / "best.pt"
    if state.best_weights is None:  # best epoch predates a --resume: read it from disk
        if rt.distributed:
            dist.barrier()
        best = load_checkpoint(path)
        state.best_weights, state.best_epoch = best["model"], best["epoch"]
    state.model_without_ddp.load_state_dict(state.best_weights)
    return path, state.best_epoch


# ----------------------------------------------------------------------------- files
@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temp path next to ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs should get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (Path, torch.dtype, torch.device)):
        return str(o)
    raise TypeError(type(o))


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def read_csv(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return [{k: _parse_number(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _parse_number(v: str):
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def save_checkpoint(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path, task: str | None = None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file
        raise UserError(f"cannot read checkpoint {path}: {type(err).__name__}: {str(err).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_name" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by this repository (no model/model_name)")
    if task is not None and ckpt.get("task") != task:
        raise UserError(f"{path} is a {ckpt.get('task')} checkpoint ({ckpt['model_name']}), not a {task} one")
    return ckpt


def get_logger(run_dir: Path | None, is_main: bool) -> logging.Logger:
    """Console + run_dir/log.txt on rank 0; silent on other ranks. No global handlers leak between runs."""
    log = logging.getLogger(f"run.{id(run_dir)}.{time.time_ns()}")
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    if is_main:
        log.addHandler(logging.StreamHandler(sys.stdout))
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            file_handler = logging.FileHandler(run_dir / "log.txt")
            file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            log.addHandler(file_handler)
    return log


def close_logger(log: logging.Logger) -> None:
    for h in list(log.handlers):
        h.close()
        log.removeHandler(h)


def environment_info(rt: Runtime) -> dict:
    info = {"argv": sys.argv, "python": sys.version.split()[0], "torch": torch.__version__,
            "device": str(rt.device), "world_size": rt.world_size, "threads": torch.get_num_threads(),
            "amp": str(rt.amp_dtype) if rt.amp_dtype else None}
    if rt.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(rt.device)
        info["cuda"] = torch.version.cuda
    return info


# ----------------------------------------------------------------------------- plots
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> None:
    plt = _plt()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_curves(rows: list[dict], keys: list[str], path: Path, ylabel: str, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in rows]
    for key in keys:
        ax.plot(epochs, [r[key] for r in rows], marker="o", ms=3, label=key.replace("_", " "))
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_bars(names: list[str], values: list[float], path: Path, ylabel: str, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(names)), 4))
    bars = ax.bar(names, values, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=8)
    ax.set(ylabel=ylabel, title=title, ylim=(0, 1.05))
    ax.tick_params(axis="x", rotation=45)
    save_figure(fig, path)


def plot_confusion(matrix, names: list[str], path: Path, title: str) -> None:
    plt = _plt()
    m = np.asarray(matrix, dtype=np.float64)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(names), 0.8 + 0.6 * len(names)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i, j in np.ndindex(norm.shape):
        ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    save_figure(fig, path)


def plot_image_grid(images: list[np.ndarray], titles: list[str], path: Path, cols: int, title: str,
                    cmap: str | None = None, title_colors: list[str] | None = None) -> None:
    plt = _plt()
    rows = max(1, math.ceil(len(images) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.75 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (img, t) in enumerate(zip(images, titles)):
        ax = axes.flat[k]
        ax.imshow(img, cmap=cmap, interpolation="nearest")
        ax.set_title(t, fontsize=7, color=(title_colors[k] if title_colors else "black"))
    fig.suptitle(title)
    save_figure(fig, path)


def filter_mosaic(weight: torch.Tensor) -> np.ndarray:
    """(out, in, k, k) kernels -> one image: a row per output channel, a column per input channel,
    each kernel scaled to [0, 1] on its own so that its pattern is visible; 1-pixel gaps."""
    w = weight.detach().float().cpu()
    out_c, in_c, kh, kw = w.shape
    flat = w.reshape(out_c, in_c, -1)
    lo, hi = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    w = ((flat - lo) / (hi - lo).clamp(min=1e-12)).reshape(out_c, in_c, kh, kw)
    canvas = torch.full((out_c, kh + 1, in_c, kw + 1), float("nan"))
    canvas[:, :kh, :, :kw] = w.permute(0, 2, 1, 3)
    canvas = canvas.reshape(out_c * (kh + 1), in_c * (kw + 1))
    return np.pad(canvas.numpy(), ((1, 0), (1, 0)), constant_values=np.nan)


def plot_filters(weight: torch.Tensor, path: Path, title: str) -> None:
    """Kernel grid; a single-input layer (like conv1) is shown as a square grid of its filters."""
    plt = _plt()
    weight = weight.detach().float().cpu()
    out_c, in_c = weight.shape[:2]
    if in_c == 1:
        side = math.ceil(math.sqrt(out_c))
        padded = torch.cat([weight, torch.full((side * side - out_c, *weight.shape[1:]), float("nan"))])
        mosaic = filter_mosaic(padded.reshape(side, side, *weight.shape[2:]))
    else:
        mosaic = filter_mosaic(weight)
    fig, ax = plt.subplots(figsize=(min(12, 2 + 0.25 * mosaic.shape[1]), min(12, 2 + 0.25 * mosaic.shape[0])))
    cmap = plt.get_cmap("gray").with_extremes(bad="white")
    ax.imshow(mosaic, cmap=cmap, interpolation="nearest")
    ax.axis("off")
    ax.set_title(title)
    save_figure(fig, path)


def summarize_training(run_dir: Path, results: dict, accuracy_label: str) -> list[dict]:
    """Add epochs/time/rate from metrics.csv to ``results`` and plot the loss and accuracy curves."""
    rows = read_csv(run_dir / "metrics.csv")
    if rows:
        results["epochs_trained"] = rows[-1]["epoch"]
        results["train_time_s"] = sum(r["epoch_time_s"] for r in rows)
        results["train_images_per_s"] = sum(r["train_images_per_s"] for r in rows) / len(rows)
        fig = run_dir / "figures"
        plot_curves(rows, ["train_loss", "val_loss"], fig / "loss_curve.png", "loss", "Loss per epoch")
        plot_curves(rows, ["train_accuracy", "val_accuracy"], fig / "accuracy_curve.png", accuracy_label,
                    f"{accuracy_label.capitalize()} per epoch")
    return rows


# ----------------------------------------------------------------------------- report
def write_report(run_dir: Path, title: str, summary: dict, tables: list[tuple[str, list[str], list[list]]],
                 figures: list[str]) -> Path:
    """A self-contained report.html: summary, tables and every figure embedded as base64 PNG."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
             "th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%;margin:1em 0}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>", _html_table(["", ""], [[k, v] for k, v in summary.items()])]
    for heading, header, rows in tables:
        parts += [f"<h2>{html.escape(heading)}</h2>", _html_table(header, rows)]
    parts.append("<h2>Figures</h2>")
    for rel in figures:
        path = run_dir / rel
        if path.exists():
            data = base64.b64encode(path.read_bytes()).decode()
            parts.append(f"<h3>{html.escape(rel)}</h3><img alt='{html.escape(rel)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    out = run_dir / "report.html"
    write_text(out, "\n".join(parts))
    return out


def _html_table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c) if isinstance(c, float) else str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
