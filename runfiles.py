"""What a run writes, and how: run folders that never mix, atomic and durable files (JSON, CSV,
checkpoints), safe checkpoint loading, the run's log."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import hardware
from utils import Runtime, UserError, broadcast_object, cleanup_runtime


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


def choose_run_dir(
    *,
    output_dir: str | None,
    output_root: str,
    model: str,
    resume: str | None,
    eval_only: str | None,
) -> Path:
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
        raise UserError(
            f"refusing {path}: it holds more than weights and plain data and could "
            f"run code when loaded ({first})"
        ) from None
    except Exception as err:  # torch raises many types for a damaged file
        first = str(err).splitlines()[0][:200] if str(err) else ""
        raise UserError(f"cannot read checkpoint {path}: {type(err).__name__}: {first}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_name" not in ckpt:
        raise UserError(
            f"{path} is not a checkpoint written by this repository (no model/model_name)"
        )
    if task is not None and ckpt.get("task") != task:
        raise UserError(
            f"{path} is a {ckpt.get('task')} checkpoint ({ckpt['model_name']}), not a {task} one"
        )
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
    info = {
        "argv": sys.argv,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": str(rt.device),
        "world_size": rt.world_size,
        "threads": torch.get_num_threads(),
        "amp": str(rt.amp_dtype) if rt.amp_dtype else None,
        "cpu_isa": hardware.describe_cpu_isa(),
    }
    if rt.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(rt.device)
        info["cuda"] = torch.version.cuda
    return info


def recorded_args(args, rt: Runtime) -> dict:
    """What args.json and every checkpoint keep: the flags as given or filled in from the
    recipe, and apart from them, under "effective", what the run uses and why."""
    return {**vars(args), "effective": rt.settings.record()}


def stop_invocation(args, rt: Runtime, run_dir: Path, log: logging.Logger) -> dict:
    """End an invocation that --stop-after-epochs stopped before the schedule's end: the run is
    unfinished (no results.json), its last.pt continues it."""
    log.info("stopped after %d epochs (--stop-after-epochs): continue with --resume %s",
             args.stop_after_epochs, run_dir / "checkpoints" / "last.pt")  # fmt: skip
    close_logger(log)
    cleanup_runtime(rt)
    return {}


def start_run(args, rt: Runtime, output_root: str) -> tuple[Path, logging.Logger]:
    """Rank 0 picks and creates the run folder (every rank gets its name), writes args.json and
    opens log.txt; other ranks get a silent logger."""
    run_dir = None
    if rt.is_main:
        run_dir = choose_run_dir(
            output_dir=args.output_dir,
            output_root=output_root,
            model=args.model,
            resume=args.resume,
            eval_only=args.eval_only,
        )
    run_dir = Path(broadcast_object(str(run_dir), rt))
    log = get_logger(run_dir if rt.is_main else None, rt.is_main)
    if rt.is_main:
        environment = environment_info(rt)
        why = rt.settings.reasons
        log.info("device %s, %d process(es), global batch %d; %s; %s; %s; %s", rt.device,
                 rt.world_size, args.batch_size * rt.world_size, why["precision"],
                 why["memory_format"], why["micro_batch"], rt.settings.allocator)  # fmt: skip
        for line in rt.settings.warnings:
            log.warning(line)
        if args.resume:  # the same run, with the checkpoint's arguments: args.json stays as it was
            log.info("resumed from %s on %s; %s", args.resume, json.dumps(environment),
                     json.dumps(rt.settings.record()))  # fmt: skip
        else:
            write_json(
                run_dir / "args.json", recorded_args(args, rt) | {"environment": environment}
            )
        log.info("run folder: %s", run_dir)
    return run_dir, log
