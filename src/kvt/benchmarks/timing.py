"""Latency measurement: warm-up, N timed iterations, robust statistics; CUDA events on a GPU.

Wall-clock timing of asynchronous CUDA work measures the launch, not the kernel; events recorded on the
stream around the call measure the device time, and one synchronisation at the end keeps the calls
back to back as they run in the pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from kvt.contract.errors import UserError


@dataclass(frozen=True)
class LatencyStats:
    """Seconds per call over ``n`` timed iterations."""

    n: int
    median: float
    p10: float
    p90: float
    mean: float
    min: float
    clock: str  # "cuda-events" or "perf_counter"

    @classmethod
    def from_samples(cls, samples: list[float], clock: str) -> LatencyStats:
        if not samples:
            raise UserError("no latency samples: iterations must be >= 1")
        values = np.asarray(samples, dtype=np.float64)
        p10, median, p90 = np.percentile(values, [10, 50, 90])
        return cls(n=len(samples), median=float(median), p10=float(p10), p90=float(p90),
                   mean=float(values.mean()), min=float(values.min()), clock=clock)

    def to_dict(self) -> dict:
        return asdict(self)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, warmup: int = 2, iterations: int = 5) -> LatencyStats:
    """Run ``fn`` ``warmup`` times untimed, then ``iterations`` times timed."""
    if warmup < 0 or iterations < 1:
        raise UserError(f"need warmup >= 0 and iterations >= 1, got {warmup} and {iterations}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        pairs = []
        for _ in range(iterations):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(device)
        return LatencyStats.from_samples([s.elapsed_time(e) / 1e3 for s, e in pairs], "cuda-events")
    samples = []
    for _ in range(iterations):
        began = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - began)
    return LatencyStats.from_samples(samples, "perf_counter")
