"""A script's command line on two gloo ranks, each forked from a warm server process.

torchrun starts one fresh interpreter for itself and one per rank, and each imports torch again:
~1.2 s of CPU, a sixth of it in the kernel mapping libraries and zeroing new pages, before the
test's few steps begin. Here a multiprocessing forkserver imports torch and the scripts once per
test session and forks each rank from that. A rank gets what torchrun would give it (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, OMP_NUM_THREADS=1) and runs
the script as its ``__main__``, exactly as ``python script.py`` would. As under torchrun, the job
fails when a rank fails, and the other ranks are then ended. torchrun itself still runs the tests
of what torchrun does (test_distributed.TORCHRUN).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import runpy
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import wait
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# What every rank imports, once here instead of in each rank: torch.optim's first optimizer
# imports torch._dynamo (sympy, triton), the reports matplotlib, sklearn and torchvision.
PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "matplotlib.pyplot", "sklearn.metrics",
           "torchvision.utils", "torchvision.datasets", "utils", "part1_classify", "part2_segment",
           "report", "ranks"]  # fmt: skip


@functools.cache
def forkserver():
    """The session's forkserver context (started at the first rank, kept until the end)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def stop_forkserver() -> None:
    """End the forkserver, if one started, and reap it: its CPU time and its ranks' then count
    in this process's children, as a timed suite should show them (conftest, at the end)."""
    from multiprocessing import forkserver as server

    stop = getattr(server._forkserver, "_stop", None)  # Python's own tests use it; 3.8+
    if stop is not None:
        stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_rank(script: str, argv: list[str], env: dict, log: str) -> None:
    """One rank, in the forked child: torchrun's environment, output to ``log``.out/.err."""
    os.environ.update(env)
    for fd, suffix in ((1, "out"), (2, "err")):
        os.dup2(os.open(f"{log}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.chdir(REPO)
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


def run_ranks(
    script, *args, env: dict | None = None, world: int = 2, timeout: float = 1800
) -> subprocess.CompletedProcess:
    """``python script args`` on ``world`` ranks; stdout and stderr are the ranks' in order,
    the exit code 0 when every rank ended with 0, else 1 (as torchrun's)."""
    port, argv = free_port(), [str(a) for a in args]
    with tempfile.TemporaryDirectory() as logs:
        procs = []
        for rank in range(world):
            rank_env = {**(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank),
                        "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                        "OMP_NUM_THREADS": "1"}  # fmt: skip
            proc = forkserver().Process(
                target=run_rank, args=(str(script), argv, rank_env, f"{logs}/{rank}")
            )
            proc.start()
            procs.append(proc)
        code = wait_for_ranks(procs, timeout, [str(script), *argv])
        out, err = ("".join(Path(f"{logs}/{r}.{s}").read_text() for r in range(world))
                    for s in ("out", "err"))  # fmt: skip
    return subprocess.CompletedProcess([str(script), *argv], code, out, err)


def wait_for_ranks(procs, timeout: float, cmd: list[str]) -> int:
    """0 when every rank ends with 0; at the first failure the others are ended (1)."""
    deadline, live = time.monotonic() + timeout, list(procs)
    while live:
        for sentinel in wait([p.sentinel for p in live], max(deadline - time.monotonic(), 0)):
            done = next(p for p in live if p.sentinel == sentinel)
            done.join()
            live.remove(done)
            if done.exitcode != 0:
                end(live)
                return 1
        if live and time.monotonic() >= deadline:
            end(live)
            raise subprocess.TimeoutExpired(cmd, timeout)
    return 0


def end(procs) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.join(5)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
