"""``kvt serve`` on the bundled CPU tritonserver: starts, prints its endpoints when every model is ready,
serves ``kvt generate --triton``, exports the orchestrator's metrics, stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kvt.cli.main import EXIT_OK, main
from kvt.contract.request import GenerationRequest
from kvt.formats.triton_repo import PYTHON_ORT
from kvt.serving.client import TritonInvalidRequest, TritonVideoClient
from kvt.serving.generator.configs import RepositoryOptions
from kvt.serving.generator.repository import build_repository
from kvt.serving.local_server import SHM_DIR, free_port

pytestmark = pytest.mark.triton
pytest.importorskip("tritonclient.grpc")
pytest.importorskip("onnxruntime")


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_kvt_serve_starts_serves_exports_metrics_and_stops(tmp_path, tiny_export_fp32):
    repo = build_repository(tmp_path / "repo", tiny_export_fp32, options=RepositoryOptions(PYTHON_ORT))
    http, grpc, metrics = free_port(), free_port(), free_port()
    shm_before = set(SHM_DIR.glob("kvt_*")) if SHM_DIR.is_dir() else set()
    tmp_before = set(Path("/tmp").glob("kvt_triton_*"))
    server = subprocess.Popen(
        [sys.executable, "-m", "kvt.cli.main", "serve", str(repo), "--http-port", str(http), "--grpc-port",
         str(grpc), "--metrics-port", str(metrics), "--tritonserver", "bundled"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = server.stdout.readline()  # blocks until the server is ready (or kvt serve fails)
        assert line.startswith("ready:"), (line, server.stderr.read() if server.poll() is not None else "")
        assert f"grpc 127.0.0.1:{grpc}" in line and f"metrics http://127.0.0.1:{metrics}/metrics" in line

        out = tmp_path / "video.mp4"
        code = main(["generate", "a lighthouse at night", "--triton", f"127.0.0.1:{grpc}", "--out", str(out),
                     "--key-frame-steps", "2", "--base-frame-steps", "2", "--interpolation-steps", "1",
                     "--no-progress", "--seed", "3"])
        assert code == EXIT_OK and out.stat().st_size > 1000

        # A request the server refuses (outside the served sizes) is counted as rejected.
        with TritonVideoClient(f"127.0.0.1:{grpc}") as client, pytest.raises(TritonInvalidRequest):
            client.generate(GenerationRequest("x", width=1024, height=64))

        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read().decode()
        model = {"model": "kandinsky_video"}  # without progress, one unary request to the orchestrator
        assert _metric(text, "kvt_requests_total", outcome="completed", **model) >= 1
        assert _metric(text, "kvt_step_duration_seconds_count", loop="base_frames", **model) >= 1
        assert _metric(text, "kvt_stage_call_duration_seconds_count", stage="unet_t2v_video", **model) >= 2
        assert _metric(text, "kvt_requests_total", outcome="rejected", model="kandinsky_video") >= 1
        assert "kvt_requests_in_flight" in text and "kvt_requests_queued" in text
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert server.returncode == EXIT_OK, server.stderr.read()
    assert re.search(r"stopped \(tritonserver exit code 0\)", server.stderr.read())
    time.sleep(0.5)
    assert (set(SHM_DIR.glob("kvt_*")) if SHM_DIR.is_dir() else set()) <= shm_before
    assert set(Path("/tmp").glob("kvt_triton_*")) <= tmp_before


def test_kvt_serve_refuses_bad_options(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    tmp_path.joinpath("repo").mkdir()
    assert main(["serve", str(tmp_path / "repo"), "--cuda-memory-pool", "lots"]) == 2
    assert "GPU:BYTES" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "repo"), "--load-model", "kandinsky_video"]) == 2
    assert "explicit" in capsys.readouterr().err


def test_explicit_mode_loads_an_orchestrators_stages(tmp_path, tiny_export_fp32):
    """With --model-control-mode explicit, `--load-model kandinsky_video` loads its stage models too."""
    from kvt.cli.main import build_parser
    from kvt.cli.serve import server_args

    repo = build_repository(tmp_path / "repo", tiny_export_fp32, options=RepositoryOptions(PYTHON_ORT))
    args = build_parser().parse_args(["serve", str(repo), "--model-control-mode", "explicit",
                                      "--load-model", "kandinsky_video"])
    args.passthrough = []
    loaded = [a.split("=", 1)[1] for a in server_args(args, repo) if a.startswith("--load-model=")]
    assert loaded[0] == "kandinsky_video"
    assert set(loaded[1:]) == {"text_encoder", "unet_t2v_image", "unet_t2v_video", "unet_interp", "movq_encoder",
                               "movq_decoder", "video_movq_decoder"}
