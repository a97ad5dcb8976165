"""CPU threads: one policy for torch and ONNX Runtime in a kvt process.

OpenMP's worker threads wait for each other at a barrier after every operator. When fewer cores are
free than the process has threads (a shared CI runner, a container whose CPU quota is below the host's
core count, a laptop compiling something), a descheduled thread holds every barrier for a scheduler
time slice. The networks of the ``tiny`` and ``small`` presets run thousands of sub-millisecond
operators per second, so two threads on a busy two-core machine were measured 10-25x slower than one
thread, while on an idle machine the second thread bought nothing for them (benchmarks/RESULTS.md,
"CPU threads").

Hence the default of one thread (:data:`DEFAULT_THREADS`): never the stall, and the same reduction
order on every machine, so a seed gives the same video whatever the load. ``--threads 0`` takes every
core this process may use (CPU affinity and the cgroup CPU quota, not the host's core count), for the
released sizes on an idle many-core CPU. ONNX Runtime sessions follow torch's setting
(``onnxruntime_backend._default_session_options``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from kvt.contract.errors import UserError

DEFAULT_THREADS = 1


class ThreadsError(UserError):
    """A thread count that is not a non-negative integer."""


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2/v1 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def _cgroup_quota() -> float | None:
    """CPUs granted by the cgroup CPU quota (``cpu.max`` v2, ``cfs_quota_us`` v1), None if unlimited."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def resolve_threads(requested: int | None) -> int:
    """``None`` -> :data:`DEFAULT_THREADS`; 0 -> :func:`available_cores`; N >= 1 -> N."""
    if requested is None:
        return DEFAULT_THREADS
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise ThreadsError(f"--threads {requested!r}: give a whole number >= 1, or 0 for every core this "
                           f"process may use ({available_cores()} here)")
    return requested if requested > 0 else available_cores()


def apply_threads(requested: int | None) -> int:
    """Set torch's intra-op threads (and so ONNX Runtime's) from ``requested``; returns the count."""
    threads = resolve_threads(requested)
    torch.set_num_threads(threads)
    return threads
