"""End-to-end generation per fps mode, split by stage, with runtime overhead and peak memory.

A :class:`TimedBackend` wraps the pipeline's backend and times every stage call (CUDA events on a GPU,
read after the request). Whatever the request's wall time does not spend inside stage calls is runtime
overhead: tokenization, the scheduler step, guidance, copies, the key frame's Pillow round trip, uint8
conversion. Loop overhead is the same within the three denoising loops only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvt.benchmarks.memory import PeakMemory
from kvt.benchmarks.timing import synchronize
from kvt.contract.plan import all_loop_phases
from kvt.contract.request import GenerationRequest
from kvt.runtime.backends.base import DelegatingBackend, StageBackend
from kvt.runtime.pipeline import KandinskyVideoPipeline, VideoOutput

LOOP_PHASES = all_loop_phases()


class TimedBackend(DelegatingBackend):
    """Forwards every call to ``inner`` and records (stage, seconds) per call."""

    def __init__(self, inner: StageBackend) -> None:
        super().__init__(inner)
        self.name = f"timed({inner.name})"
        # (stage, start, end): CUDA events on a GPU, perf_counter() seconds on the CPU
        self._pending: list[tuple[str, Any, Any]] = []

    def _run(self, stage: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inner backend's whole ``run`` (its validation included), timed."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.inner.run(stage, inputs)
            end.record()
            self._pending.append((stage, start, end))
            return out
        began = time.perf_counter()
        out = self.inner.run(stage, inputs)
        self._pending.append((stage, began, time.perf_counter()))
        return out

    def reset(self) -> None:
        self._pending = []

    def calls(self) -> list[tuple[str, float]]:
        """(stage, seconds) of every call since :meth:`reset` (synchronises a GPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [(s, a.elapsed_time(b) / 1e3) for s, a, b in self._pending]
        return [(s, b - a) for s, a, b in self._pending]



@dataclass(frozen=True)
class RequestSettings:
    prompt: str = "a red fox in the snow"
    width: int = 64
    height: int = 64
    seed: int = 0
    key_frame_steps: int = 50
    base_frame_steps: int = 50
    interpolation_steps: int = 10

    def request(self, fps: str, steps_cap: int | None = None) -> GenerationRequest:
        cap = (lambda n: min(n, steps_cap)) if steps_cap else (lambda n: n)
        return GenerationRequest(prompt=self.prompt, width=self.width, height=self.height, fps=fps,
                                 seed=self.seed, key_frame_steps=cap(self.key_frame_steps),
                                 base_frame_steps=cap(self.base_frame_steps),
                                 interpolation_steps=cap(self.interpolation_steps))


@dataclass
class E2EResult:
    pipeline: str
    backend: str
    fps: str
    wall_s: float
    stages: dict[str, dict[str, float]]  # stage -> {"calls", "seconds"}
    phases: dict[str, float]
    memory: dict
    prompt_encodings: int
    output: VideoOutput | None = field(default=None, repr=False)

    @property
    def stage_seconds(self) -> float:
        return sum(v["seconds"] for v in self.stages.values())

    @property
    def outside_stages_s(self) -> float:
        return self.wall_s - self.stage_seconds

    @property
    def overhead_fraction(self) -> float:
        return self.outside_stages_s / self.wall_s

    @property
    def loop_overhead_fraction(self) -> float:
        """(Loop wall time - U-Net and re-encode calls in the loops) / request wall time."""
        loop_wall = sum(self.phases.get(p, 0.0) for p in LOOP_PHASES)
        inside = sum(v["seconds"] for s, v in self.stages.items() if s.startswith("unet_"))
        text = self.stages.get("text_encoder", {"calls": 0, "seconds": 0.0})
        if text["calls"] > 1:  # official-style re-encodes inside loops B and C
            inside += text["seconds"] * (text["calls"] - 1) / text["calls"]
        return max(loop_wall - inside, 0.0) / self.wall_s

    def to_dict(self) -> dict:
        return {"pipeline": self.pipeline, "backend": self.backend, "fps": self.fps, "wall_s": self.wall_s,
                "stages": self.stages, "phases": self.phases, "memory": self.memory,
                "prompt_encodings": self.prompt_encodings, "stage_seconds": self.stage_seconds,
                "outside_stages_s": self.outside_stages_s, "overhead_fraction": self.overhead_fraction,
                "loop_overhead_fraction": self.loop_overhead_fraction}


def run_e2e(pipeline: KandinskyVideoPipeline, name: str, settings: RequestSettings, fps: str,
            warmup_steps: int | None = 2) -> E2EResult:
    """One warm-up request (steps capped at ``warmup_steps``; None = no warm-up), then one timed."""
    inner = pipeline.backend
    timed = inner if isinstance(inner, TimedBackend) else TimedBackend(inner)
    pipeline.backend = timed
    try:
        if warmup_steps is not None:
            pipeline.generate(settings.request(fps, warmup_steps), progress=False)
        encodings_before = getattr(pipeline, "prompt_encodings", None)
        timed.reset()
        synchronize(pipeline.device)
        with PeakMemory(pipeline.device) as peak:
            start = time.perf_counter()
            output = pipeline.generate(settings.request(fps), progress=False)
            synchronize(pipeline.device)
            wall = time.perf_counter() - start
        calls = timed.calls()
    finally:
        pipeline.backend = timed.inner
    stages: dict[str, dict[str, float]] = {}
    for stage, seconds in calls:
        entry = stages.setdefault(stage, {"calls": 0, "seconds": 0.0})
        entry["calls"] += 1
        entry["seconds"] += seconds
    # the official-style pipeline counts its encodings (read above: the attribute exists when not None)
    encodings = (getattr(pipeline, "prompt_encodings", 0) - encodings_before if encodings_before is not None
                 else stages.get("text_encoder", {}).get("calls", 0))
    memory = peak.result
    assert memory is not None  # set when the with block above exits
    return E2EResult(pipeline=name, backend=timed.inner.name, fps=fps, wall_s=wall, stages=stages,
                     phases={k: v for k, v in output.timings.items() if k != "total"},
                     memory=memory.to_dict(), prompt_encodings=int(encodings), output=output)


def compare_outputs(candidate: VideoOutput, reference: VideoOutput) -> dict[str, float]:
    """Error figures of ``candidate`` against ``reference``: latents (float) and frames (uint8)."""
    a, b = candidate.latents.double(), reference.latents.double()
    diff = a - b
    rel_l2 = float(diff.norm() / b.norm()) if float(b.norm()) else float("nan")
    cosine = float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
    fa, fb = candidate.frames.astype(np.int16), reference.frames.astype(np.int16)
    frame_diff = np.abs(fa - fb)
    mse = float(np.mean((fa - fb).astype(np.float64) ** 2))
    psnr = float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)
    return {"latent_max_abs": float(diff.abs().max()), "latent_rel_l2": rel_l2, "latent_cosine": cosine,
            "frames_max_abs": int(frame_diff.max()), "frames_mean_abs": float(frame_diff.mean()),
            "frames_psnr_db": psnr}
