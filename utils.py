"""Runtime and plumbing shared by both parts: device / AMP / DDP, collectives, run folders,
atomic and durable files, checkpoints, logging.

Nothing here knows about Fashion-MNIST, facades or training; ``engine.py`` holds the loop,
``metrics.py`` the metrics, ``report.py`` figures and HTML, ``cli.py`` the flags.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import pickle
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist


class UserError(Exception):
    """Bad input (missing folder, corrupt file, wrong flag): shown as one line, exit code 2."""


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def run_cli(main: Callable, parser, argv=None) -> None:
    """Parse arguments and run ``main``; a user error becomes one line on stderr and exit 2.
    Under torchrun a failing rank leaves at once with its code: torchrun then stops the others,
    where a normal interpreter exit could hang in (or abort from) the process group's teardown."""
    args = parser.parse_args(argv)
    code = 0
    try:
        returned = main(args)
        code = returned if isinstance(returned, int) else 0  # e.g. predict: 1 if an image failed
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted: checkpoints/last.pt holds the last finished epoch (--resume it)",
              file=sys.stderr)
        code = 130
    if code and launched_by_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


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
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x


def setup_runtime(*, device: str = "auto", amp: bool = False, amp_dtype: str = "bf16",
                  channels_last: bool = False, threads: int | None = None,
                  progress: bool = True) -> Runtime:
    """Pick the device, start DDP when launched by torchrun, set up AMP."""
    if threads:
        torch.set_num_threads(threads)
    cuda_ok = torch.cuda.is_available()
    if device == "cuda" and not cuda_ok:
        raise UserError("--device cuda was given but CUDA is not available on this machine "
                        "(use --device cpu or auto)")
    use_cuda = cuda_ok and device != "cpu"
    if amp and amp_dtype == "fp16" and not use_cuda:
        raise UserError("--amp-dtype fp16 needs CUDA; use the default bf16 on the CPU")
    rank, local_rank, world_size = 0, 0, 1
    if launched_by_torchrun():
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    dtype = (torch.float16 if amp_dtype == "fp16" else torch.bfloat16) if amp else None
    torch_device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    # The scaler only does something for fp16; for bf16/fp32 it is a pass-through.
    scaler = torch.amp.GradScaler(torch_device.type, enabled=dtype is torch.float16)
    if use_cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device=torch_device, rank=rank, local_rank=local_rank, world_size=world_size,
                   amp_dtype=dtype, scaler=scaler, channels_last=channels_last, progress=progress)


def cleanup_runtime(rt: Runtime) -> None:
    """End a successful run: every rank waits until rank 0 has written its outputs, then all
    tear the process group down together (a rank leaving early made gloo abort at exit)."""
    if rt.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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


def prepare_model(model: torch.nn.Module, rt: Runtime, *, compile_model: bool = False,
                  sync_bn: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
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


# ----------------------------------------------------------------------------- files
def fsync_path(path: Path) -> None:
    """Flush a file or a folder entry to disk (a rename is durable only once its folder is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temp path next to ``path``; if the block succeeds, flush it to disk, rename it over
    ``path`` and flush the folder, so a crash leaves either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs should get the usual permissions
    try:
        yield Path(tmp)
        fsync_path(Path(tmp))
        os.replace(tmp, path)
        fsync_path(path.parent)
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


# ----------------------------------------------------------------------------- run folders
RUN_MARKERS = ("args.json", "log.txt", "metrics.csv", "results.json", "checkpoints")


def holds_run(folder: Path) -> bool:
    return any((Path(folder) / name).exists() for name in RUN_MARKERS)


def new_run_dir(parent: Path, name: str) -> Path:
    """Create ``parent/name`` (or ``name-2``, ``name-3``, ...): mkdir is atomic, so two runs
    started in the same second never share a folder."""
    parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, 1000):
        candidate = parent / (name if k == 1 else f"{name}-{k}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise UserError(f"cannot create a new run folder for {name} in {parent}")


def run_folder_of(checkpoint: Path) -> Path | None:
    """RUN for RUN/checkpoints/NAME.pt, else None."""
    checkpoint = Path(checkpoint).resolve()
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def choose_run_dir(*, output_dir: str | None, output_root: str, model: str,
                   resume: str | None, eval_only: str | None) -> Path:
    """The folder this invocation writes. Training never writes into another run's folder;
    --resume continues its checkpoint's run; --eval-only writes a new eval-TIME folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if resume:
        home = run_folder_of(Path(resume))
        target = Path(output_dir) if output_dir else home
        if target is None:
            raise UserError(f"{resume} is not inside a RUN/checkpoints/ folder: give --output-dir")
        if home is None or target.resolve() != home:
            _refuse_existing_run(target, "a resumed run writes its own folder")
        target.mkdir(parents=True, exist_ok=True)
        return target
    if output_dir:
        _refuse_existing_run(Path(output_dir), "use --resume to continue it, or a new --output-dir")
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        return Path(output_dir)
    if eval_only:
        home = run_folder_of(Path(eval_only))
        parent = home if home is not None else Path(output_root)
        return new_run_dir(parent, f"eval-{stamp}" if home is not None else f"{stamp}-eval-{model}")
    return new_run_dir(Path(output_root), f"{stamp}-{model}")


def _refuse_existing_run(folder: Path, hint: str) -> None:
    if folder.is_dir() and holds_run(folder):
        raise UserError(f"{folder} already holds a run ({hint})")


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_epoch_checkpoints(obj: dict, folder: Path, is_best: bool) -> None:
    """best.pt before last.pt: a crash in between leaves last.pt one epoch behind a newer
    best.pt, never a best.pt older than what last.pt claims as best."""
    if is_best:
        save_checkpoint(obj, folder / "best.pt")
    save_checkpoint(obj, folder / "last.pt")


def load_checkpoint(path, task: str | None = None) -> dict:
    """Load with ``weights_only=True``: tensors, numbers, strings and containers only, so a
    checkpoint from elsewhere cannot run code on load."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        raise UserError(f"refusing {path}: it holds more than weights and plain data and could "
                        f"run code when loaded ({first})") from None
    except Exception as err:  # torch raises many types for a damaged file
        first = str(err).splitlines()[0][:200] if str(err) else ""
        raise UserError(f"cannot read checkpoint {path}: {type(err).__name__}: {first}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_name" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by this repository "
                        "(no model/model_name)")
    if task is not None and ckpt.get("task") != task:
        raise UserError(f"{path} is a {ckpt.get('task')} checkpoint ({ckpt['model_name']}), "
                        f"not a {task} one")
    return ckpt


# ----------------------------------------------------------------------------- logging
def get_logger(run_dir: Path | None, is_main: bool) -> logging.Logger:
    """Console + run_dir/log.txt on rank 0; silent on other ranks. No global handlers leak
    between runs."""
    log = logging.getLogger(f"run.{id(run_dir)}.{time.time_ns()}")
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    if is_main:
        log.addHandler(logging.StreamHandler(sys.stdout))
        if run_dir is not None:
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
            "device": str(rt.device), "world_size": rt.world_size,
            "threads": torch.get_num_threads(), "amp": str(rt.amp_dtype) if rt.amp_dtype else None}
    if rt.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(rt.device)
        info["cuda"] = torch.version.cuda
    return info


def start_run(args, rt: Runtime, output_root: str) -> tuple[Path, logging.Logger]:
    """Rank 0 picks and creates the run folder (every rank gets its name), writes args.json and
    opens log.txt; other ranks get a silent logger."""
    run_dir = None
    if rt.is_main:
        run_dir = choose_run_dir(output_dir=args.output_dir, output_root=output_root,
                                 model=args.model, resume=args.resume, eval_only=args.eval_only)
    run_dir = Path(broadcast_object(str(run_dir), rt))
    log = get_logger(run_dir if rt.is_main else None, rt.is_main)
    if rt.is_main:
        environment = environment_info(rt)
        if args.resume:  # the same run, with the checkpoint's arguments: args.json stays as it was
            log.info("resumed from %s on %s", args.resume, json.dumps(environment))
        else:
            write_json(run_dir / "args.json", {**vars(args), "environment": environment})
        log.info("run folder: %s", run_dir)
        log.info("device %s, %d process(es), global batch %d, amp %s", rt.device, rt.world_size,
                 args.batch_size * rt.world_size, rt.amp_dtype)
    return run_dir, log
