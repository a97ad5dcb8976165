"""Bounded soak test on loopback (``slow``): several clients for a few minutes against the real server.

Every response must equal the in-process result for its seed, no request may fail, and the server's
resident memory (tritonserver plus its python-backend stubs) may not grow beyond RSS_GROWTH_BOUND_MIB
between the end of the warm-up and the end of the run. Duration and clients come from
``KVT_SOAK_SECONDS`` (default 180) and ``KVT_SOAK_CLIENTS`` (default 4); ``KVT_SOAK_REPORT=FILE``
writes the figures as JSON (the run recorded in README and benchmarks/RESULTS.md used it).
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.triton]

psutil = pytest.importorskip("psutil")
pytest.importorskip("tritonclient.grpc")

from kvt.contract.request import GenerationRequest  # noqa: E402
from kvt.formats import triton_repo  # noqa: E402
from kvt.runtime.pipeline import KandinskyVideoPipeline  # noqa: E402
from kvt.serving.client import TritonVideoClient  # noqa: E402
from kvt.serving.generator import configs  # noqa: E402
from kvt.serving.generator.repository import build_repository  # noqa: E402
from kvt.serving.local_server import ServerError, TritonServer, find_bundled_triton  # noqa: E402

RSS_GROWTH_BOUND_MIB = 64.0
SEEDS = range(8)


def _request(seed: int) -> GenerationRequest:
    # Even seeds: fps low (12 frames); odd: medium (45 frames, one interpolation pass).
    return GenerationRequest("a paper boat on a river", width=64, height=64, seed=seed,
                             fps="low" if seed % 2 == 0 else "medium",
                             key_frame_steps=3, base_frame_steps=3, interpolation_steps=2)


def _server_rss(process: psutil.Process) -> float:
    """MiB resident in the server and all its children (python-backend stubs)."""
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def test_soak(tmp_path, tiny_export_fp32):
    try:
        find_bundled_triton()
    except ServerError as exc:
        pytest.skip(f"no tritonserver binary: {exc}")
    seconds = float(os.environ.get("KVT_SOAK_SECONDS", "180"))
    clients = int(os.environ.get("KVT_SOAK_CLIENTS", "4"))
    local = KandinskyVideoPipeline.from_onnx(tiny_export_fp32, device="cpu")
    expected = {seed: local.generate(_request(seed), progress=False).frames for seed in SEEDS}
    del local

    repo = build_repository(tmp_path / "repo", tiny_export_fp32,
                            options=configs.RepositoryOptions(triton_repo.PYTHON_ORT))
    latencies: list[float] = []
    errors: list[str] = []
    mismatches: list[int] = []
    lock = threading.Lock()
    with TritonServer(repo) as server:
        proc = psutil.Process(server.process.pid)
        with TritonVideoClient(server.http_url, "http", timeout=300) as warm:  # every stage touched once
            for seed in (0, 1):
                assert np.array_equal(warm.generate(_request(seed)).frames, expected[seed])
        rss_start = _server_rss(proc)
        rss_samples = [rss_start]
        stop_at = time.monotonic() + seconds

        def client_loop(index: int) -> None:
            protocol = "grpc" if index % 2 else "http"
            url = server.grpc_url if protocol == "grpc" else server.http_url
            count = 0
            with TritonVideoClient(url, protocol, timeout=300) as client:
                while time.monotonic() < stop_at:
                    seed = SEEDS[(index + count * clients) % len(SEEDS)]
                    count += 1
                    start = time.monotonic()
                    try:
                        frames = client.generate(_request(seed)).frames
                    except Exception as exc:  # every failure is counted, none may happen
                        with lock:
                            errors.append(f"{type(exc).__name__}: {exc}")
                        continue
                    with lock:
                        latencies.append(time.monotonic() - start)
                        if not np.array_equal(frames, expected[seed]):
                            mismatches.append(seed)

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            time.sleep(5)
            rss_samples.append(_server_rss(proc))
        rss_end = _server_rss(proc)
        assert server.is_alive()
    p50, p99 = (float(np.percentile(latencies, q)) for q in (50, 99)) if latencies else (float("nan"),) * 2
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs), {platform.platform()}",
        "command": f"KVT_SOAK_SECONDS={seconds:g} KVT_SOAK_CLIENTS={clients} pytest -m slow tests/test_soak.py",
        "duration_s": seconds, "clients": clients, "requests": len(latencies) + len(errors),
        "errors": len(errors), "mismatches": len(mismatches), "p50_s": p50, "p99_s": p99,
        "server_rss_mib": {"after_warmup": rss_start, "end": rss_end, "max": max(rss_samples),
                           "growth": rss_end - rss_start},
        "request": "tiny preset, 64x64, seeds 0-7 (even: fps low, odd: fps medium), steps 3/3/2",
    }
    print("\nsoak:", json.dumps(report, indent=1))
    if os.environ.get("KVT_SOAK_REPORT"):
        Path(os.environ["KVT_SOAK_REPORT"]).write_text(json.dumps(report, indent=1) + "\n")
    assert not errors, errors[:5]
    assert not mismatches, f"responses differing from the in-process result for seeds {sorted(set(mismatches))}"
    assert len(latencies) >= clients, "the soak served almost nothing"
    assert rss_end - rss_start <= RSS_GROWTH_BOUND_MIB, f"server RSS grew {rss_end - rss_start:.1f} MiB"
