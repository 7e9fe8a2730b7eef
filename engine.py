"""Training and evaluation, shared by both parts: ``train_one_epoch``, ``evaluate``, the
per-epoch history (metrics.csv, best epoch), the training state that checkpoints hold and
``fit``, the epoch loop. The optimiser lives in optimizers.py, the losses in losses.py."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

import allocator
import optimizers
import runfiles
import utils
from ema import WeightAverage
from metrics import ConfusionMatrix, PixelScores
from utils import Runtime


# ----------------------------------------------------------------------------- the loop
def train_one_epoch(
    model,
    loader,
    loss_fn,
    optimizer,
    scheduler,
    rt: Runtime,
    epoch: int,
    *,
    max_steps: int | None = None,
    metric=None,
    log_interval: int = 10,
    ema: WeightAverage | None = None,
) -> dict:
    model.train()
    loss_sum = torch.zeros((), device=rt.device)
    seen = 0
    steps = steps_per_epoch(loader, max_steps)
    chunk = rt.micro_batch  # settled: used only where it gives the whole batch's gradient
    bar = tqdm(
        total=steps,
        desc=f"epoch {epoch} train",
        leave=False,
        dynamic_ncols=True,
        disable=not (rt.is_main and rt.progress),
    )
    start = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        if step >= steps:
            break
        x, y = rt.to_input(x), y.to(rt.device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss = forward_backward(model, x, y, loss_fn, rt, chunk, metric)
        rt.scaler.step(optimizer)
        rt.scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update()
        loss_sum += loss * x.shape[0]
        seen += x.shape[0]
        bar.update(1)
        if step % log_interval == 0:  # .item() syncs the device: only every few steps
            rate = seen * rt.world_size / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.0f}")
    bar.close()
    result = pass_summary(host_totals([loss_sum.reshape(1)], 1, seen), start, rt)
    result["loss"] = result.pop("sums")[0] / max(result["images"], 1)
    return result | finish_metric(metric, rt)


def forward_backward(model, x, y, loss_fn, rt: Runtime, chunk: int | None, metric=None):
    """Forward and backward of one training batch; returns its loss (detached, fp32). With a
    ``chunk`` size (``rt.micro_batch``) the batch runs in chunks whose losses are weighted by their
    share of it, so the accumulated gradient is the whole batch's (faster where a whole batch's
    activations slow the kernels down; DDP reduces once, at the last chunk). settings.settle
    gives a chunk size only where that holds: no batch norm, an unweighted mean loss."""
    size = chunk or len(x)
    chunks = list(zip(x.split(size), y.split(size)))
    total = torch.zeros((), device=rt.device)
    for i, (xs, ys) in enumerate(chunks):
        last = i == len(chunks) - 1
        sync = (
            model.no_sync() if not last and hasattr(model, "no_sync") else contextlib.nullcontext()
        )
        with sync:
            with rt.autocast():
                logits = model(xs)
                loss = loss_fn(logits, ys) * (len(xs) / len(x))
            rt.scaler.scale(loss).backward()
        total += loss.detach().float()
        if metric is not None:
            metric.update(logits.detach().float(), ys)
    return total


@torch.inference_mode()
def evaluate(model, loader, loss_fn, rt: Runtime, metric=None, desc: str = "eval") -> dict:
    """Exact loss and metric over every sample of the sharded loader. ``model`` is the unwrapped
    network: ranks with an empty shard then run no collective inside a forward pass."""
    model.eval()
    batch_sums, seen = [], 0
    start = time.perf_counter()
    bar = tqdm(
        loader, desc=desc, leave=False, dynamic_ncols=True, disable=not (rt.is_main and rt.progress)
    )
    with rt.eval_layout(model):
        for x, y in bar:
            x, y = rt.to_input(x, train=False), y.to(rt.device, non_blocking=True)
            with rt.autocast():
                logits = model(x)
            logits = logits.float()  # fp32 already: the models' last layer runs outside autocast
            batch_sums.append(loss_fn.sums(logits, y))  # fp32 on the device: MPS has no fp64
            seen += x.shape[0]
            if metric is not None:
                metric.update(logits, y)
    result = pass_summary(host_totals(batch_sums, loss_fn.num_sums, seen), start, rt)
    result["loss"] = loss_fn.value(result.pop("sums")[:-1]) if result["images"] else float("nan")
    return result | finish_metric(metric, rt)


def validate_both_views(model, flipped, loader, loss_fn, rt: Runtime, metric, key: str) -> dict:
    """The selected checkpoint on the validation split as it is and with test-time flips
    (``flipped``), each scored by a fresh ``metric()``'s ``key``: the numbers that decide --tta,
    where the test set must not."""
    plain = evaluate(model, loader, loss_fn, rt, metric(), desc="val")[key]
    mirrored = evaluate(flipped, loader, loss_fn, rt, metric(), desc="val, flips")[key]
    return {f"val_{key}": plain, f"val_{key}_tta": mirrored}


def host_totals(batch_sums: list[torch.Tensor], size: int, seen: int) -> torch.Tensor:
    """The per-batch fp32 sums of the device added up in fp64 on the host (MPS has no fp64),
    with the image count last; zeros for a rank whose shard was empty (it still all-reduces)."""
    sums = torch.zeros(size, dtype=torch.float64)
    if batch_sums:
        sums = torch.stack(batch_sums).cpu().double().sum(0)
    return torch.cat([sums, torch.tensor([float(seen)], dtype=torch.float64)])


def pass_summary(sums: torch.Tensor, start: float, rt: Runtime) -> dict:
    """All-reduce the host's fp64 ``sums`` (last entry: the image count) once; time and rate of
    the pass. nccl reduces GPU tensors, gloo CPU ones."""
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    on_gpu = rt.distributed and rt.device.type == "cuda"
    sums = utils.all_reduce_sum(sums.to(rt.device) if on_gpu else sums, rt).cpu()
    images = int(sums[-1].item())
    return {
        "sums": sums.tolist(),  # Python floats (doubles): the device never sees them
        "images": images,
        "time_s": elapsed,
        "images_per_s": images / max(elapsed, 1e-9),
    }


def finish_metric(metric, rt: Runtime) -> dict:
    if metric is None:
        return {}
    metric.all_reduce(rt)
    return metric.compute()


def steps_per_epoch(loader, max_steps: int | None) -> int:
    return len(loader) if max_steps is None else min(len(loader), max_steps)


# ----------------------------------------------------------------------------- history
class History:
    """The rows of metrics.csv and the best epoch so far by ``key`` (``mode`` "max" or "min").
    Every rank keeps one: validation numbers are all-reduced, so all ranks agree on the best."""

    def __init__(
        self,
        path: Path,
        key: str,
        mode: str,
        log: logging.Logger,
        epochs: int,
        ap_every: int = 0,
        flops: tuple[float, float] | None = None,
    ):
        self.path, self.key, self.mode, self.log, self.epochs = path, key, mode, log, epochs
        self.ap_every = ap_every  # a val_mean_ap column, filled every ap_every epochs
        self.flops = flops  # (per training image, forward + backward; per validation image)
        self.rows: list[dict] = []
        self.best_value, self.best_epoch = None, None  # restore_training sets them on --resume

    def add(self, epoch: int, lr: float, train: dict, val: dict | None, rt: Runtime) -> bool:
        """Record an epoch (rank 0 writes metrics.csv and logs it); True if it is the best.
        ``val`` None: not validated this epoch (--val-every), so it cannot be the best."""
        validated = val is not None
        val = val or {"loss": float("nan"), "images": 0, "time_s": 0.0}
        row = {"epoch": epoch, "lr": lr, "train_loss": train["loss"], "val_loss": val["loss"]}
        if "accuracy" in train:
            row.update(train_accuracy=train["accuracy"], val_accuracy=val.get("accuracy"))
        if self.ap_every:
            row["val_mean_ap"] = val.get("mean_ap", float("nan"))
        row.update(
            epoch_time_s=train["time_s"] + val["time_s"], train_images_per_s=train["images_per_s"]
        )
        if self.flops:
            row.update(
                train_tflop=train["images"] * self.flops[0] / 1e12,
                val_tflop=val["images"] * self.flops[1] / 1e12,
            )
        if not validated or val["images"] == 0:  # no validation numbers (its compute stays)
            row.update({k: float("nan") for k in row if k.startswith("val_") and k != "val_tflop"})
        if not validated:
            improved = False
        elif val["images"] == 0:  # no validation set: the last epoch is the one to keep
            improved = True
        else:
            value, best = row[self.key], self.best_value
            improved = best is None or (value > best if self.mode == "max" else value < best)
        if improved:
            self.best_value, self.best_epoch = row[self.key], epoch
        self.rows.append(row)
        if rt.is_main:
            runfiles.write_csv(self.path, self.rows)
            shown = "  ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch")
            self.log.info("epoch %d/%d  %s", epoch, self.epochs, shown)
        return improved


def out_of_time(started: float, limit_min: float | None, rt: Runtime) -> bool:
    """Rank 0's clock decides and every rank follows, so no rank waits for one that stopped."""
    over = limit_min is not None and time.perf_counter() - started > 60 * limit_min
    return bool(utils.broadcast_object(over, rt))


# ----------------------------------------------------------------------------- training state
def training_state(
    model, optimizer, scheduler, rt: Runtime, epoch: int, history: History, ema=None
) -> dict:
    """What a checkpoint needs, besides the run's description, to continue exactly. "model" is
    the network that is validated and tested (with --ema the average; the trained weights are
    then under "ema"), so --eval-only and predict read every checkpoint alike."""
    averaged = {}
    if ema is not None:
        averaged = {"ema": {"trained_model": model.state_dict(), "updates": ema.updates}}
    return averaged | {
        "model": (ema.model if ema is not None else model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": rt.scaler.state_dict(),
        "epoch": epoch,
        "best_value": history.best_value,
        "best_epoch": history.best_epoch,
        "best_key": history.key,
        "rng": utils.get_rng_state(),
        "metrics": history.rows[-1],
    }


def restore_training(
    ckpt: dict, model, optimizer, scheduler, rt: Runtime, history: History, ema=None
) -> int:
    """Load weights (and their average), optimiser, schedule, scaler and RNG from ``ckpt``;
    returns the next epoch."""
    if ema is not None:
        model.load_state_dict(ckpt["ema"]["trained_model"])
        ema.load_state_dict({"model": ckpt["model"], "updates": ckpt["ema"]["updates"]})
    else:
        model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    rt.scaler.load_state_dict(ckpt["scaler"])
    utils.set_rng_state(ckpt["rng"])
    history.rows = [r for r in runfiles.read_csv(history.path) if int(r["epoch"]) <= ckpt["epoch"]]
    history.best_value, history.best_epoch = ckpt.get("best_value"), ckpt.get("best_epoch")
    return ckpt["epoch"] + 1


def copy_weights(model: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def load_best_weights(model, best_weights: dict | None, run_dir: Path, rt: Runtime) -> None:
    """The best epoch's weights on every rank: kept in memory, or (best epoch before a --resume)
    read by rank 0 from best.pt and broadcast, so no rank needs rank 0's file system."""
    if best_weights is None and rt.is_main:
        best_weights = runfiles.load_checkpoint(run_dir / "checkpoints" / "best.pt")["model"]
    if best_weights is not None:
        model.load_state_dict(best_weights)
    utils.broadcast_module_state(model, rt)


# ----------------------------------------------------------------------------- the epoch loop
def fit(
    args,
    rt: Runtime,
    models: tuple,
    loaders: tuple,
    loss_fn,
    run_dir: Path,
    log: logging.Logger,
    meta: dict,
    ckpt: dict | None,
    *,
    select: tuple[str, str],
    ap_every: int = 0,
    flops: tuple[float, float] | None = None,
) -> dict:
    """Train for the recipe's epochs (from ``ckpt`` on --resume): train, validate, record,
    checkpoint; end with the best epoch by ``select`` = (metrics.csv column, "max"/"min") in the
    model. ``models`` = (model to train, unwrapped model); ``meta`` describes the run in each
    checkpoint; ``ap_every`` > 0 adds the validation pixels' mean AP every that many epochs and
    at the last (segmentation); ``flops`` (per training image, forward + backward; per
    validation image) adds the compute of each epoch to metrics.csv. Validation runs every
    ``args.val_every`` epochs and at the last; the best is chosen among validated epochs.
    Returns which checkpoint the test numbers come from and the compute spent (TFLOP), or None
    where --stop-after-epochs ended this invocation before the schedule's end."""
    model, model_without_ddp = models
    train_loader, val_loader = loaders
    num_classes = len(meta["class_names"])
    steps = steps_per_epoch(train_loader, args.max_steps)
    optimizer, scheduler = optimizers.optimizer_and_schedule(model_without_ddp, args, steps)
    history = History(run_dir / "metrics.csv", *select, log, args.epochs, ap_every, flops)
    ema = WeightAverage(model_without_ddp, args.ema) if args.ema else None
    evaluated = ema.model if ema is not None else model_without_ddp  # validated, selected, tested
    start_epoch = 1
    if ckpt is not None:
        start_epoch = restore_training(
            ckpt, model_without_ddp, optimizer, scheduler, rt, history, ema
        )
    last_epoch = min(args.epochs, start_epoch - 1 + (args.stop_after_epochs or args.epochs))
    # The start-up's temporaries (data decoding, normalisation) were freed into the kept heap:
    # back to the kernel once, so that they do not stay resident under training. Not per phase:
    # that cost Part 1 a fifth of its epoch time in page faults (docs/speed.md).
    allocator.release_once("start-up")
    best_weights, started = None, time.perf_counter()
    for epoch in range(start_epoch, last_epoch + 1):
        train_loader.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        train_stats = train_one_epoch(
            model,
            train_loader,
            loss_fn,
            optimizer,
            scheduler,
            rt,
            epoch,
            max_steps=args.max_steps,
            metric=ConfusionMatrix(num_classes),
            ema=ema,
        )
        utils.broadcast_module_state(model_without_ddp, rt)  # rank 0's BatchNorm statistics
        if ema is not None:
            utils.broadcast_module_state(evaluated, rt)
        # Rank 0's clock decides before validation, so the epoch a time limit stops at gets its
        # validation AP like the planned last one.
        stopping = epoch < last_epoch and out_of_time(started, args.time_limit, rt)
        # The planned last epoch or a time-limit stop; the end of a --stop-after-epochs
        # invocation is not: it validates on schedule only, as the uninterrupted run does.
        final = epoch == args.epochs or stopping
        val_stats = None
        if final or epoch % args.val_every == 0:
            ap_due = ap_every and (epoch % ap_every == 0 or final)
            val_metric = (
                PixelScores(num_classes, softmax=False) if ap_due else ConfusionMatrix(num_classes)
            )
            val_stats = evaluate(
                evaluated, val_loader, loss_fn, rt, val_metric, desc=f"epoch {epoch} val"
            )
        is_best = history.add(epoch, lr, train_stats, val_stats, rt)
        if is_best:
            best_weights = copy_weights(evaluated)
        if rt.is_main:
            state = training_state(model_without_ddp, optimizer, scheduler, rt, epoch, history, ema)
            runfiles.save_epoch_checkpoints(meta | state, run_dir / "checkpoints", is_best)
        if stopping:
            log.info("time limit of %g min reached after epoch %d", args.time_limit, epoch)
            break
    if not final:  # --stop-after-epochs ended this invocation: no selection, no test yet
        return None
    allocator.release_once("training")  # the test and the figures allocate afresh
    load_best_weights(model_without_ddp, best_weights, run_dir, rt)
    tested = {
        "checkpoint": str(run_dir / "checkpoints" / "best.pt"),
        "checkpoint_epoch": history.best_epoch,
    }
    # Every epoch trained, also those before a --resume (their rows were read back), unless a
    # row comes from before compute was recorded (read back empty).
    for key in ("train_tflop", "val_tflop") if flops else ():
        if all(isinstance(row.get(key), (int, float)) for row in history.rows):
            tested[key] = sum(row[key] for row in history.rows)
    return tested
