"""Keep freed memory for reuse: allocate like a training loop, not like a one-off script.

A training step allocates and frees the same large tensors (activations, gradients) again and
again. glibc serves blocks above its mmap threshold (128 KiB at first, at most 32 MiB) with a
fresh ``mmap`` and returns them with ``munmap`` when freed, and it trims the heap's free top;
the kernel then zeroes every page again at the next step. On the team's CPU that was a third of
Part 1's CPU time in the kernel (docs/speed.md). Here, at start-up, glibc is told to serve every
block from its heap and to keep what is freed: the next step reuses the same pages.

Elsewhere (macOS, musl, Windows) nothing is changed: their allocators have other rules, and no
dependency is worth adding for this. PyTorch's own CPU launcher preloads tcmalloc or jemalloc for
the same reason; a user of these scripts need not set ``LD_PRELOAD``.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path

# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
# Free heap top kept rather than returned to the kernel: more than any run here frees at once.
TRIM_THRESHOLD = 1 << 30


def glibc():
    """The process's C library if it is glibc, else None (no dependency on finding it by name)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt, libc.malloc_trim  # noqa: B018  (in every glibc; checked before use)
    except (OSError, AttributeError):  # musl and others: no gnu_get_libc_version
        return None
    return libc


def release_freed(libc=None) -> None:
    """Give the heap's free pages back to the kernel (glibc's ``malloc_trim``): with freed
    memory kept, what a finished phase freed stays resident otherwise. The next allocations touch
    those pages afresh, once. Elsewhere (not glibc): nothing."""
    libc = libc or glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def release_once(moment: str) -> None:
    """``release_freed`` once per process at each ``moment`` of a run, where what was freed is
    not needed again: "start-up", before the first epoch (the data's decoding and
    normalisation); "training", after the last epoch (the steps' activations, which the test
    and the figures would otherwise grow the heap past); "exit", when the command's work is
    done (torch's C++ exit handlers touch ~118 MB of new pages, above the run's peak while the
    heap still holds what the run freed). Once: a process that trains many times (the test
    suite) would otherwise fault its whole heap in again each time. docs/speed.md."""
    release_freed()


def keep_freed_memory(libc=None) -> str:
    """Tell glibc to serve large blocks from its heap (no mmap) and keep freed memory (no trim);
    returns what was set and why, for the run's first log line and args.json. Harmless to call
    again. ``libc``: the C library to use (tests pass a stand-in); default: the process's."""
    libc = libc or glibc()
    if libc is None:
        return "allocator: the C library's defaults (not glibc)"
    applied = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    if not applied:
        return "allocator: glibc's defaults (mallopt refused the settings)"
    return (
        "allocator: glibc keeps freed memory for reuse (no mmap per block, no heap trim): "
        "measured faster, the kernel no longer zeroes pages at every step"
    )


def peak_rss_mib(usage) -> float:
    """The process's peak resident memory: /proc's VmHWM where there is one, since Linux's
    ru_maxrss of a process started from a larger one counts the parent's pages at the fork
    (every probe of the benchmark read the benchmark's own 4.5 GB); else ``usage.ru_maxrss``
    (a ``resource.getrusage`` result). Here, beside the allocator's setting, because it needs
    no torch: a test's probe process reads it without importing torch."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)  # bytes there
