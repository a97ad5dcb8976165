"""Benchmarks in CI size (marker ``bench``): the entry point, the measurement pieces, the fast path.

GPU-only pieces (CUDA events, CUDA graphs, FP16 weights) cannot run here; what runs is their CPU
behaviour and every piece of bookkeeping around them.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from kvt.benchmarks.e2e_bench import RequestSettings, TimedBackend, compare_outputs, run_e2e
from kvt.benchmarks.flops import DevicePeak, achieved, count_flops, device_peak, meta_stage_modules, stage_call_flops
from kvt.benchmarks.memory import PeakMemory
from kvt.benchmarks.stage_bench import bench_stage_calls, benchmark_calls
from kvt.benchmarks.timing import LatencyStats, measure
from kvt.benchmarks.triton_bench import bench_concurrency
from kvt.cli.main import EXIT_INVALID, build_parser, main
from kvt.contract.plan import request_plan
from kvt.models.presets import get_preset
from kvt.models.random_weights import random_models
from kvt.runtime.backends.torch_backend import TorchBackend
from kvt.runtime.fast_path import (
    FastPathOptions,
    FastTorchBackend,
    OfficialStyleBackend,
    build_baseline_pipeline,
    build_fast_pipeline,
    models_with_precision,
)

pytestmark = pytest.mark.bench

STEPS = (1, 1, 1)


@pytest.fixture(scope="module")
def tiny_models():
    return random_models(get_preset("tiny"), seed=0)


# ---------------------------------------------------------------------------------------- timing


def test_latency_stats_percentiles() -> None:
    stats = LatencyStats.from_samples([float(i) for i in range(1, 12)], "perf_counter")
    assert (stats.n, stats.median, stats.min) == (11, 6.0, 1.0)
    assert stats.p10 == pytest.approx(2.0) and stats.p90 == pytest.approx(10.0)
    with pytest.raises(ValueError, match="no latency samples"):
        LatencyStats.from_samples([], "perf_counter")


def test_measure_counts_warmup_and_iterations() -> None:
    calls = []
    stats = measure(lambda: calls.append(1), torch.device("cpu"), warmup=2, iterations=3)
    assert len(calls) == 5 and stats.n == 3 and stats.clock == "perf_counter"
    with pytest.raises(ValueError, match="iterations >= 1"):
        measure(lambda: None, torch.device("cpu"), warmup=0, iterations=0)


def test_peak_memory_sees_a_large_allocation() -> None:
    with PeakMemory("cpu") as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert peak.result.rss_peak_bytes > 64 * 2**20
    assert peak.result.cuda_max_allocated_bytes is None


# ---------------------------------------------------------------------------------------- FLOPs


def test_flops_of_a_linear_layer_and_mfu() -> None:
    layer = torch.nn.Linear(64, 32, bias=False)
    assert count_flops(layer, (torch.zeros(8, 64),)) == 2 * 8 * 64 * 32
    tflops, mfu = achieved(10**12, 0.5, DevicePeak("H100", 989.4))
    assert tflops == pytest.approx(2.0) and mfu == pytest.approx(2.0 / 989.4)
    assert achieved(10**12, 0.5, device_peak("cpu"))[1] is None


def test_meta_flops_match_real_modules(tiny_models) -> None:
    backend = TorchBackend(tiny_models)
    meta, table = meta_stage_modules("tiny")
    dims = {"N": 36, "h": 8, "w": 8}
    real = stage_call_flops(backend.modules, backend.table, "unet_t2v_video", dims, device="cpu")
    assert real > 0
    assert stage_call_flops(meta, table, "unet_t2v_video", dims, device="meta") == real


# ---------------------------------------------------------------------------------------- stage / e2e


def test_benchmark_calls_cover_every_plan_shape_once() -> None:
    calls = benchmark_calls(64, 64)
    keys = [(c.stage, tuple(sorted(c.dims.items()))) for c in calls]
    assert len(keys) == len(set(keys))
    for fps in ("low", "medium", "high"):
        for call in request_plan(64, 64, fps, False):
            assert (call.stage, tuple(sorted(call.dims.items()))) in keys


def test_stage_bench_rows(tiny_models) -> None:
    backend = TorchBackend(tiny_models)
    calls = [c for c in benchmark_calls(64, 64, ("low",)) if c.stage in ("unet_t2v_image", "movq_encoder")]
    results = bench_stage_calls(backend, calls, device_peak("cpu"), warmup=0, iterations=2)
    assert [r.stage for r in results] == ["unet_t2v_image", "movq_encoder"]
    for r in results:
        assert r.latency.n == 2 and r.flops > 0 and r.tflops > 0 and r.mfu is None


def test_timed_backend_attributes_every_call(tiny_models) -> None:
    pipeline = build_baseline_pipeline(tiny_models)
    settings = RequestSettings(width=64, height=64, key_frame_steps=2, base_frame_steps=2, interpolation_steps=1)
    result = run_e2e(pipeline, "baseline", settings, "medium", warmup_steps=None)
    expected = {c.stage: c.calls for c in request_plan(64, 64, "medium", False, 2, 2, 1)}
    expected["text_encoder"] = 3  # official-style: initial encode + loops B and C
    assert {s: int(v["calls"]) for s, v in result.stages.items()} == expected
    assert result.prompt_encodings == 3
    assert 0 <= result.overhead_fraction < 0.5 and result.stage_seconds <= result.wall_s
    assert not isinstance(pipeline.backend, TimedBackend)  # restored


# ---------------------------------------------------------------------------------------- fast path


def test_fast_path_options_resolve_per_device() -> None:
    cpu = FastPathOptions().resolved(torch.device("cpu"))
    assert (cpu.unet_dtype, cpu.text_encoder_dtype, cpu.channels_last, cpu.cuda_graphs) == (
        torch.float32, torch.float32, False, False)
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        FastPathOptions(cuda_graphs=True).resolved(torch.device("cpu"))


def test_models_with_precision_shares_matching_networks(tiny_models) -> None:
    same = models_with_precision(tiny_models, unet=torch.float32, text_encoder=torch.float32)
    assert same is tiny_models
    converted = models_with_precision(tiny_models, text_encoder=torch.bfloat16)
    assert converted.unet_t2v is tiny_models.unet_t2v
    assert {p.dtype for p in converted.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in tiny_models.text_encoder.parameters()} == {torch.float32}
    t5 = converted.text_encoder.t5
    assert t5.shared.weight is t5.encoder.embed_tokens.weight  # the tie survives the copy


@pytest.mark.parametrize("stage", ["unet_t2v_video", "unet_interp", "movq_decoder"])
def test_channels_last_and_math_attention_keep_outputs(stage) -> None:
    models = random_models(get_preset("tiny"), seed=1)  # own copy: channels-last converts weights in place
    reference = TorchBackend(models)
    spec = reference.table[stage]
    inputs = spec.sample_inputs(spec.opt_dims(), seed=3)
    expected = reference.run(stage, inputs)
    official = OfficialStyleBackend(models).run(stage, inputs)
    fast = FastTorchBackend(models, FastPathOptions(channels_last=True)).run(stage, inputs)
    for name, value in expected.items():
        torch.testing.assert_close(official[name], value, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast[name], value, rtol=1e-4, atol=1e-5)
        assert fast[name].is_contiguous()


def test_fast_and_baseline_videos_agree(tiny_models) -> None:
    settings = RequestSettings(width=64, height=64, key_frame_steps=1, base_frame_steps=1, interpolation_steps=1)
    base = run_e2e(build_baseline_pipeline(tiny_models), "baseline", settings, "low", warmup_steps=None)
    fast = run_e2e(build_fast_pipeline(tiny_models), "fast", settings, "low", warmup_steps=None)
    assert (base.prompt_encodings, fast.prompt_encodings) == (2, 1)
    errors = compare_outputs(fast.output, base.output)
    assert errors["latent_rel_l2"] < 1e-4 and errors["frames_max_abs"] <= 1


# ------------------------------------------------------------------ the concurrency harness (no server)


def test_bench_concurrency_harness_with_a_sleeping_sender() -> None:
    """The worker/barrier/timing logic alone; the sender here is a 20 ms sleep, not a server."""
    active, peak_active = [0], [0]
    lock = threading.Lock()

    def make_sender():
        def send():
            with lock:
                active[0] += 1
                peak_active[0] = max(peak_active[0], active[0])
            time.sleep(0.02)
            with lock:
                active[0] -= 1
        return send

    results = bench_concurrency(make_sender, levels=(1, 2, 4), requests_per_worker=2, warmup=1)
    assert [r.concurrency for r in results] == [1, 2, 4]
    assert [r.requests for r in results] == [2, 4, 8]
    assert peak_active[0] == 4
    # A server that overlaps requests perfectly: throughput grows with concurrency.
    assert results[2].throughput_rps > 2 * results[0].throughput_rps
    assert all(r.latency.median >= 0.02 for r in results)


def test_triton_sender_rejects_an_unknown_protocol() -> None:
    from kvt.benchmarks.triton_bench import tritonclient_sender

    with pytest.raises(ValueError, match="'http' or 'grpc'"):
        tritonclient_sender("localhost:8000", "udp", prompt="p", seed=0, width=64, height=64, fps="low",
                            key_frame_steps=1, base_frame_steps=1, interpolation_steps=1)


# The Triton sender against the real bundled tritonserver: tests/test_triton.py
# (test_triton_benchmark_against_the_real_server).


# ---------------------------------------------------------------------------------------- entry point


def test_bench_parser_registers_subcommands() -> None:
    args = build_parser().parse_args(["bench", "e2e", "--preset", "tiny", "--steps", "1,1,1"])
    assert args.bench_command == "e2e" and args.steps == "1,1,1" and callable(args.func)


def test_cli_rejects_bad_values(tmp_path, capsys) -> None:
    assert main(["bench", "e2e", "--steps", "1,1", "--out", str(tmp_path)]) == EXIT_INVALID
    assert "--steps '1,1'" in capsys.readouterr().err
    assert main(["bench", "stage", "--pipelines", "fastest", "--out", str(tmp_path)]) == EXIT_INVALID
    assert "allowed: baseline, fast" in capsys.readouterr().err


def test_cli_stage_and_e2e_write_json_markdown_and_plots(tmp_path) -> None:
    assert main(["bench", "stage", "--preset", "tiny", "--fps-modes", "low", "--stages",
                 "unet_t2v_image,movq_encoder", "--warmup", "0", "--iterations", "1", "--out", str(tmp_path),
                 "--name", "s"]) == 0
    data = json.loads((tmp_path / "s.json").read_text())
    assert set(data["results"]) == {"baseline", "fast"} and len(data["results"]["fast"]) == 2
    assert "speed-up" in (tmp_path / "s.md").read_text()
    assert (tmp_path / "s.png").stat().st_size > 1000

    assert main(["bench", "e2e", "--preset", "tiny", "--fps-modes", "low", "--steps", "1,1,1", "--warmup-steps",
                 "-1", "--out", str(tmp_path), "--name", "e"]) == 0
    data = json.loads((tmp_path / "e.json").read_text())
    assert {(r["pipeline"], r["fps"]) for r in data["results"]} == {("baseline", "low"), ("fast", "low")}
    assert data["fast_vs_baseline"]["low"]["frames_max_abs"] <= 1
    markdown = (tmp_path / "e.md").read_text()
    assert "| stage | calls | latency | share |" in markdown and "runtime (outside stage calls)" in markdown
    assert (tmp_path / "e.png").stat().st_size > 1000
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes left nothing behind


def test_cli_flops_on_the_meta_device(tmp_path) -> None:
    assert main(["bench", "flops", "--preset", "tiny", "--width", "64", "--height", "64", "--out", str(tmp_path),
                 "--name", "f"]) == 0
    data = json.loads((tmp_path / "f.json").read_text())
    per_request = data["per_request"]
    assert per_request["high"]["cuts"] > per_request["medium"]["cuts"] > per_request["low"]["cuts"] > 0
    for fps, counts in per_request.items():  # the exact cuts remove work at every fps mode
        assert counts["cuts_hoisted"] < counts["cuts"] < counts["official"], fps
    call = data["per_call"]["unet_t2v_video {'N': 36, 'h': 8, 'w': 8}"]
    assert call["cuts"] < call["official"] and 0 < call["text_work"] < call["cuts"]
    assert call["input_bytes"] == 36 * (9 * 8 * 8 + 1) * 4 + 2 * 16 * (32 * 4 + 1) + 2 * 4 + 3 * 36 * 4
