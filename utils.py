"""The runtime shared by both parts: user errors and the CLI wrapper, device / AMP / DDP setup,
seeding, and the collectives that keep ranks in step.

Nothing here knows about Fashion-MNIST, facades or training; ``engine.py`` holds the loop,
``metrics.py`` the metrics, ``runfiles.py`` what a run writes, ``report.py`` figures and HTML,
``cli.py`` the flags.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist

import allocator
import hardware
import settings
from errors import UserError  # noqa: F401  (re-exported: utils.UserError)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def run_cli(main: Callable, parser, argv=None) -> None:
    """Parse arguments and run ``main``; a user error becomes one line on stderr and exit 2.
    Under torchrun every rank leaves with os._exit once its streams are flushed, whatever ended
    it: a failing rank at once (a user error with its line and code 2, any other exception with
    its traceback and code 1; torchrun then stops the others), a finished one after
    cleanup_runtime's barrier. A normal interpreter exit could hang in, or abort from, gloo's
    teardown ("terminate called without an active exception", seen in a CI run after every
    output had been written). The C library's allocator is set up first, and what the run freed
    goes back to the kernel before the exit (allocator.py)."""
    allocator.keep_freed_memory()
    args = parser.parse_args(argv)
    code = 0
    try:
        returned = main(args)
        code = returned if isinstance(returned, int) else 0  # e.g. predict: 1 if an image failed
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(
            "interrupted: checkpoints/last.pt holds the last finished epoch (--resume it)",
            file=sys.stderr,
        )
        code = 130
    except Exception:  # a bug, not bad input: the traceback, once; under torchrun via os._exit
        if not launched_by_torchrun():
            raise
        traceback.print_exc()
        code = 1
    if launched_by_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    allocator.release_once("exit")  # before the C++ exit handlers, which os._exit skips
    sys.exit(code)


# ----------------------------------------------------------------------------- runtime
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    settings: settings.Effective = settings.PLAIN  # what the run uses and why ("effective")
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    scaler: torch.amp.GradScaler | None = None
    progress: bool = True

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return DTYPES[self.settings.amp_dtype]

    @property
    def channels_last(self) -> bool:  # the model and training inputs
        return self.settings.channels_last

    @property
    def eval_channels_last(self) -> bool:  # evaluation (hardware.CPU_AVX2_STANDARD_LAYOUT)
        return self.settings.eval_channels_last

    @property
    def micro_batch(self) -> int | None:  # training batches in chunks (engine.forward_backward)
        return self.settings.micro_batch or None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        """Autocast in the run's precision; none at all for fp32 (one code path for both, and
        no autocast object where a torch lacks one for the device, as MPS before 2.5)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_input(self, x: torch.Tensor, *, train: bool = True) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if (self.channels_last if train else self.eval_channels_last) and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    @contextlib.contextmanager
    def eval_layout(self, model: torch.nn.Module):
        """The model in the evaluation memory format while inside, in the training one after
        (the parameters keep their identity, so optimiser state and DDP are unaffected)."""
        if self.eval_channels_last == self.channels_last:
            yield model
            return
        convert_layout(model, self.eval_channels_last)
        try:
            yield model
        finally:
            convert_layout(model, self.channels_last)


def convert_layout(model: torch.nn.Module, channels_last: bool) -> None:
    """Out of inference mode even when called in it: weights made there could not be trained."""
    with torch.inference_mode(False), torch.no_grad():
        model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def setup_runtime(
    effective: settings.Effective,
    *,
    threads: int | None = None,
    progress: bool = True,
    hw: hardware.Hardware | None = None,
) -> Runtime:
    """Apply the settled ``effective`` settings: threads, DDP when launched by torchrun (where
    every rank follows rank 0's settings: ``settings.follow``), the gradient scaler and the
    CUDA math flags."""
    if threads:
        torch.set_num_threads(threads)
    kind = effective.device
    rank, local_rank, world_size = 0, 0, 1
    if launched_by_torchrun():
        if kind == "mps":
            raise UserError("torchrun has no process-group backend for MPS; use --device cpu")
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if kind == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    torch_device = torch.device(f"cuda:{local_rank}" if kind == "cuda" else kind)
    rt = Runtime(torch_device, effective, rank, local_rank, world_size, progress=progress)
    decided = broadcast_object(effective.record(), rt)  # rank 0 decides
    if rank != 0:
        effective = settings.follow(effective, decided, rank, hw or hardware.read_hardware())
    if kind == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # The scaler only does something for fp16; for bf16/fp32 it is a pass-through.
    scaler = torch.amp.GradScaler(torch_device.type, enabled=effective.scaler)
    return replace(rt, settings=effective, scaler=scaler)


def settled_runtime(hw: hardware.Hardware | None = None, *, threads=None, progress=True,
                    **flags) -> Runtime:  # fmt: skip
    """``settings.settle`` then ``setup_runtime``: for entry points whose flags need no
    checkpoint rules (predict, the benchmark, tests). ``allocator`` in ``flags``: what the
    process's allocator is, for a caller that left it as it was (else freed memory is kept)."""
    hw = hw or hardware.read_hardware()
    flags["allocator"] = flags.get("allocator") or allocator.keep_freed_memory()
    effective = settings.settle(hw, **flags)
    return setup_runtime(effective, threads=threads, progress=progress, hw=hw)


def cleanup_runtime(rt: Runtime) -> None:
    """End a successful run: every rank waits until rank 0 has written its outputs. The process
    group is left to the process's end (run_cli ends torchrun ranks with os._exit): destroying it
    here deadlocked torch 2.3 and 2.4, whose DDP Reducer, freed afterwards under the GIL, dropped
    the group's last reference while gloo's worker thread waited for the GIL."""
    if rt.distributed and dist.is_initialized():
        dist.barrier()


def seed_everything(seed: int) -> None:
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


def prepare_model(
    model: torch.nn.Module, rt: Runtime, *, compile_model: bool = False, sync_bn: bool = False
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Move to the device; returns (model to train, unwrapped model for evaluation and saving)."""
    if sync_bn and rt.distributed:
        if rt.device.type != "cuda":
            raise UserError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model_without_ddp = model
    if compile_model:
        model = torch.compile(model)
    if rt.distributed:
        device_ids = [rt.local_rank] if rt.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model, model_without_ddp


# ----------------------------------------------------------------------------- collectives
# Evaluation runs under inference_mode, and torch 2.3's all_gather refuses the tensors made there
# ("Inplace update to inference tensor outside InferenceMode"): so the collectives below work on
# tensors made with inference mode off (a copy of a few numbers, or of what is gathered anyway).
def all_reduce_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """The sum of ``t`` over ranks, as a new tensor when distributed: use the result."""
    if not rt.distributed:
        return t
    with torch.inference_mode(False):
        total = t.clone()  # not in place: ``t`` may be an inference tensor
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_gather_cat(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of all ranks (shards may differ in length)."""
    if not rt.distributed:
        return t
    with torch.inference_mode(False):  # normal tensors in and out (see above)
        n = torch.tensor([t.shape[0]], device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(rt.world_size)]
        dist.all_gather(sizes, n)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        chunks = [torch.empty_like(padded) for _ in range(rt.world_size)]
        dist.all_gather(chunks, padded)
        return torch.cat([c[: int(s.item())] for c, s in zip(chunks, sizes)])


def dataset_order(n: int, world_size: int) -> torch.Tensor:
    """Where the rank-concatenated evaluation shards (rank r: r, r+W, ...) sit in dataset order."""
    return torch.cat([torch.arange(n)[r::world_size] for r in range(world_size)])


def gather_in_dataset_order(local: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Undo the evaluation sharding: the full tensor of all ranks, in dataset order."""
    gathered = all_gather_cat(local, rt)
    if not rt.distributed:
        return gathered
    out = torch.empty_like(gathered)
    out[dataset_order(len(gathered), rt.world_size).to(gathered.device)] = gathered
    return out


def broadcast_object(obj, rt: Runtime):
    """Rank 0's ``obj`` on every rank: decisions (folder names, stopping) are made once."""
    if not rt.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_module_state(module: torch.nn.Module, rt: Runtime) -> None:
    """Copy rank 0's parameters and buffers (e.g. BatchNorm running statistics, which each rank
    updates from its own batches) to every rank, so that all ranks evaluate the same model."""
    if rt.distributed:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)
