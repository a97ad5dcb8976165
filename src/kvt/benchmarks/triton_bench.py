"""Client-side latency and throughput of a served pipeline at several concurrency levels.

The measurement takes any callable that sends one request and returns when its response is complete,
so the measurement itself knows nothing of the server; :func:`tritonclient_sender` wires it to the
orchestrator model with the project's Triton client. Each worker thread gets its own client (the HTTP
client is not safe to share between threads).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kvt.benchmarks.timing import LatencyStats
from kvt.contract.errors import UserError
from kvt.contract.request import GenerationRequest
from kvt.serving.client import TritonVideoClient
from kvt.serving.protocol import request_to_arrays

Sender = Callable[[], object]

ORCHESTRATOR_MODEL = "kandinsky_video"


@dataclass(frozen=True)
class ConcurrencyResult:
    concurrency: int
    requests: int
    wall_s: float
    latency: LatencyStats

    @property
    def throughput_rps(self) -> float:
        return self.requests / self.wall_s

    def to_dict(self) -> dict:
        return {"concurrency": self.concurrency, "requests": self.requests, "wall_s": self.wall_s,
                "throughput_rps": self.throughput_rps, "latency": self.latency.to_dict()}


def bench_concurrency(make_sender: Callable[[], Sender], levels: Iterable[int] = (1, 2, 4),
                      requests_per_worker: int = 2, warmup: int = 1) -> list[ConcurrencyResult]:
    """For each level c: c threads, each with its own sender, each sending ``requests_per_worker``.

    ``make_sender`` is called once per worker thread (one client per thread). Every worker first sends
    ``warmup`` untimed requests, then all start the timed part together at a barrier.
    """
    results = []
    for level in levels:
        if level < 1:
            raise UserError(f"concurrency levels must be >= 1, got {level}")
        barrier = threading.Barrier(level)
        latencies: list[float] = []
        spans: list[tuple[float, float]] = []
        lock = threading.Lock()

        def worker(barrier: threading.Barrier = barrier, lock: threading.Lock = lock,
                   latencies: list[float] = latencies, spans: list[tuple[float, float]] = spans) -> None:
            send = make_sender()
            for _ in range(warmup):
                send()
            barrier.wait()
            began = time.perf_counter()
            local = []
            for _ in range(requests_per_worker):
                start = time.perf_counter()
                send()
                local.append(time.perf_counter() - start)
            with lock:
                latencies.extend(local)
                spans.append((began, time.perf_counter()))

        with ThreadPoolExecutor(max_workers=level) as pool:
            futures = [pool.submit(worker) for _ in range(level)]
            for future in futures:
                future.result()
        # Throughput over the timed part only: from the barrier to the last response.
        timed_wall = max(end for _, end in spans) - min(begin for begin, _ in spans)
        results.append(ConcurrencyResult(level, len(latencies), timed_wall,
                                         LatencyStats.from_samples(latencies, "perf_counter")))
    return results


def tritonclient_sender(url: str, protocol: str = "http", model: str = ORCHESTRATOR_MODEL, *,
                        prompt: str, seed: int, width: int, height: int, fps: str,
                        key_frame_steps: int, base_frame_steps: int,
                        interpolation_steps: int) -> Callable[[], Sender]:
    """A sender factory for :func:`bench_concurrency` that calls ``model`` through tritonclient.

    The request's arrays come from kvt.serving.protocol (the one table of the orchestrator's
    input names and dtypes) and travel through :class:`TritonVideoClient`, so this benchmark sends
    exactly what the project's client sends.
    """
    if protocol not in ("http", "grpc"):
        raise UserError(f"protocol {protocol!r} is not allowed: use 'http' or 'grpc'")

    arrays = request_to_arrays(GenerationRequest(
        prompt=prompt, seed=seed, width=width, height=height, fps=fps, key_frame_steps=key_frame_steps,
        base_frame_steps=base_frame_steps, interpolation_steps=interpolation_steps))

    def make_sender() -> Sender:
        client = TritonVideoClient(url, protocol, model=model)
        return lambda: client.infer_arrays(arrays)

    return make_sender
