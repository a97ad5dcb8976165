"""The orchestrator's own Prometheus metrics, through Triton's custom-metrics API (python backend
``pb_utils.MetricFamily``); they appear on the server's metrics endpoint (``:8002/metrics``) next to
Triton's ``nv_*`` metrics.

| metric | kind | labels |
|---|---|---|
| ``kvt_step_duration_seconds`` | histogram | model, loop (key_frame, base_frames, interpolation) |
| ``kvt_stage_call_duration_seconds`` | histogram | model, stage |
| ``kvt_requests_in_flight`` | gauge | model |
| ``kvt_requests_queued`` | gauge | model (received by the instance, not yet started) |
| ``kvt_requests_total`` | counter | model, outcome (completed, rejected, cancelled, timed_out, failed) |
"""

from __future__ import annotations

from typing import Any

OUTCOMES = ("completed", "rejected", "cancelled", "timed_out", "failed")
LOOPS = ("key_frame", "base_frames", "interpolation")
# Step and stage-call latency buckets: from tiny CPU calls (ms) to full-size fps-high steps (seconds).
BUCKETS = [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


class OrchestratorMetrics:
    """Every metric of one orchestrator model; a no-op where the python backend has no metrics API."""

    def __init__(self, pb_utils: Any, model: str, stages: tuple[str, ...]) -> None:
        self.enabled = hasattr(pb_utils, "MetricFamily")
        if not self.enabled:
            return
        family: Any = pb_utils.MetricFamily
        labels = {"model": model}
        steps = family(name="kvt_step_duration_seconds", description="Seconds per sampler step (stage call, "
                       "guidance and sampler), per denoising loop", kind=family.HISTOGRAM)
        calls = family(name="kvt_stage_call_duration_seconds", description="Seconds per stage call (BLS "
                       "round trip to the stage model)", kind=family.HISTOGRAM)
        gauges = {name: family(name=name, description=text, kind=family.GAUGE) for name, text in (
            ("kvt_requests_in_flight", "Requests this model is generating"),
            ("kvt_requests_queued", "Requests received by this model and not yet started"))}
        requests = family(name="kvt_requests_total", description="Requests by outcome", kind=family.COUNTER)
        # Families must outlive their metrics: keep them.
        self._families = [steps, calls, requests, *gauges.values()]
        self.steps = {loop: steps.Metric(labels={**labels, "loop": loop}, buckets=BUCKETS) for loop in LOOPS}
        self.calls = {stage: calls.Metric(labels={**labels, "stage": stage}, buckets=BUCKETS) for stage in stages}
        self.in_flight = gauges["kvt_requests_in_flight"].Metric(labels=labels)
        self.queued = gauges["kvt_requests_queued"].Metric(labels=labels)
        self.requests = {o: requests.Metric(labels={**labels, "outcome": o}) for o in OUTCOMES}

    def step(self, loop: str, seconds: float) -> None:
        if self.enabled and loop in self.steps:
            self.steps[loop].observe(seconds)

    def stage_call(self, stage: str, seconds: float) -> None:
        if self.enabled and stage in self.calls:
            self.calls[stage].observe(seconds)

    def set_in_flight(self, count: int) -> None:
        if self.enabled:
            self.in_flight.set(count)

    def set_queued(self, count: int) -> None:
        if self.enabled:
            self.queued.set(count)

    def outcome(self, outcome: str) -> None:
        if self.enabled:
            self.requests[outcome].increment(1)
