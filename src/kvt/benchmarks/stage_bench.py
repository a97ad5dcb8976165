"""Per-stage latency at the shapes one request uses, with FLOPs, achieved TFLOP/s and MFU.

The calls come from ``request_plan`` (the stage calls of a request), so the benchmarked shapes are the
ones the pipeline really runs; each distinct (stage, dims) is timed once.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from kvt.benchmarks.flops import DevicePeak, achieved, count_flops, meta_stage_modules_for, stage_precision
from kvt.benchmarks.timing import LatencyStats, measure
from kvt.contract.plan import StageCall, request_plan
from kvt.runtime.backends.base import StageBackend


@dataclass(frozen=True)
class StageResult:
    stage: str
    dims: dict[str, int]
    latency: LatencyStats
    flops: int | None
    tflops: float | None
    mfu: float | None
    precision: str = "fp16"  # the peak the MFU is taken against (flops.precision_key)

    def to_dict(self) -> dict:
        return {"stage": self.stage, "dims": self.dims, "latency": self.latency.to_dict(),
                "flops": self.flops, "tflops": self.tflops, "mfu": self.mfu, "precision": self.precision}


def distinct_calls(plan: Iterable[StageCall]) -> list[StageCall]:
    """Each (stage, dims) once, in plan order."""
    seen, out = set(), []
    for call in plan:
        key = (call.stage, tuple(sorted(call.dims.items())))
        if key not in seen:
            seen.add(key)
            out.append(call)
    return out


def benchmark_calls(width: int, height: int, fps_modes: Iterable[str] = ("low", "medium", "high"),
                    with_image: bool = False) -> list[StageCall]:
    """Every distinct stage call of requests at width x height in the given fps modes."""
    plan: list[StageCall] = []
    for fps in fps_modes:
        plan += request_plan(width, height, fps, with_image)
    return distinct_calls(plan)


class FlopCache:
    """FLOPs per (stage, input shapes), counted once per key.

    Counted on meta-device copies of the networks where possible (no memory, no device time, the same
    count on every device); stages the meta device cannot run (T5) are counted on the real modules.
    """

    def __init__(self, real_modules: Mapping[str, torch.nn.Module] | None,
                 meta_modules: Mapping[str, torch.nn.Module] | None = None) -> None:
        self.real_modules = real_modules or {}
        self.meta_modules = meta_modules or {}
        self._cache: dict[tuple, int | None] = {}

    @classmethod
    def for_backend(cls, backend: StageBackend) -> FlopCache:
        """Meta copies of a torch backend's networks; None counts for backends without torch modules."""
        modules = getattr(backend, "modules", None)
        models = getattr(backend, "models", None)
        if modules is None or models is None:
            return cls(None)

        return cls(modules, meta_stage_modules_for(models.config, cuts=getattr(backend, "cuts", True)))

    @staticmethod
    def key_of(backend: StageBackend) -> object:
        """Backends with the same key count the same FLOPs (same networks, same cuts)."""
        return getattr(backend, "cuts", True)

    def __call__(self, stage: str, inputs: Mapping[str, torch.Tensor], input_names: tuple[str, ...]) -> int | None:
        key = (stage, tuple((n, tuple(inputs[n].shape)) for n in input_names))
        if key not in self._cache:
            if stage in self.meta_modules:
                module, device = self.meta_modules[stage], torch.device("meta")
            elif stage in self.real_modules:
                module = self.real_modules[stage]
                device = next(module.parameters()).device
            else:
                self._cache[key] = None
                return None
            self._cache[key] = count_flops(module, tuple(inputs[n].to(device) for n in input_names))
        return self._cache[key]


def bench_stage_calls(backend: StageBackend, calls: Iterable[StageCall], peak: DevicePeak,
                      warmup: int = 2, iterations: int = 5, flops: FlopCache | None = None,
                      seed: int = 0) -> list[StageResult]:
    """Time each call with contract-valid sample inputs on the backend's device."""
    flops = flops or FlopCache.for_backend(backend)
    results = []
    for call in calls:
        spec = backend.table[call.stage]
        inputs = spec.sample_inputs(call.dims, device=backend.device, seed=seed)
        stats = measure(functools.partial(backend.run, call.stage, inputs), backend.device, warmup, iterations)
        count = flops(call.stage, inputs, spec.input_names)
        precision = stage_precision(getattr(backend, "modules", None), call.stage)
        tflops, mfu = achieved(count, stats.median, peak, precision) if count is not None else (None, None)
        results.append(StageResult(call.stage, dict(call.dims), stats, count, tflops, mfu, precision))
    return results
