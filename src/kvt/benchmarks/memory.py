"""Peak memory of a benchmarked region: process RSS high-water mark and CUDA max allocated.

Linux keeps the RSS high-water mark (VmHWM) per process; writing 5 to /proc/self/clear_refs resets it,
so each region gets its own peak instead of the process's lifetime maximum. Where that is not possible
the peak is the lifetime maximum, and ``rss_peak_scope`` says so.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class MemoryPeak:
    rss_peak_bytes: int
    rss_peak_scope: str  # "region" (reset before it) or "process" (lifetime maximum)
    cuda_max_allocated_bytes: int | None
    cuda_max_reserved_bytes: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def _vm_hwm() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.result``."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.result: MemoryPeak | None = None
        self._scope = "process"

    def __enter__(self) -> PeakMemory:
        try:
            _CLEAR_REFS.write_text("5")
            self._scope = "region"
        except OSError:
            self._scope = "process"
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        rss = _vm_hwm()
        if rss is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            rss = rss if sys.platform == "darwin" else rss * 1024
            self._scope = "process"
        allocated = reserved = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            allocated = torch.cuda.max_memory_allocated(self.device)
            reserved = torch.cuda.max_memory_reserved(self.device)
        self.result = MemoryPeak(rss, self._scope, allocated, reserved)
