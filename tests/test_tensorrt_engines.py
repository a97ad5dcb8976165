"""TensorRT plans of the tiny export against ONNX Runtime (needs TensorRT and a CUDA GPU).

Builds every stage of the fp16 export (strongly typed: FP16 U-Nets, FP32 T5 and MoVQs) for 64x64 and
fps low + high (so the interpolation U-Net gets its two profiles), then, polygraphy-style, runs the
same inputs through each plan and through ONNX Runtime on the CPU and compares with FP16 tolerances.
Also: the cache reuses every plan on a second build, CUDA-graph replays equal plain execution, and
``KandinskyVideoPipeline.from_engines`` generates a video through the one denoising loop.

Skips with the reason when TensorRT or a GPU is missing (the case on this project's CPU machines).
"""

from __future__ import annotations

import pytest
import torch

from kvt.runtime.backends.tensorrt.trt_env import TensorRTUnavailable, import_tensorrt

pytestmark = pytest.mark.tensorrt


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return (f"needs a CUDA GPU (torch {torch.__version__} sees none); run on a GPU machine, e.g. in "
                "nvcr.io/nvidia/tensorrt")
    try:
        import_tensorrt()
    except TensorRTUnavailable as exc:
        return f"needs TensorRT: {exc}"
    return None


SKIP = _skip_reason()
if SKIP:
    pytestmark = [pytest.mark.tensorrt, pytest.mark.skip(reason=SKIP)]

# FP16 U-Nets: both runtimes compute in FP16 but with different kernels and reduction orders. FP32
# stages: TensorRT may use TF32 for FP32 convolutions and matmuls (its default).
TOLERANCES = {"fp16": (3e-2, 3e-2), "fp32": (1e-2, 1e-2)}  # (rtol, atol), as polygraphy's --rtol/--atol


def _close(name: str, got: torch.Tensor, want: torch.Tensor, precision: str) -> None:
    rtol, atol = TOLERANCES[precision]
    got, want = got.float().cpu(), want.float().cpu()
    assert got.shape == want.shape, name
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    excess = ((got - want).abs() - (atol + rtol * want.abs())).max().item()
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
    assert excess <= 0 and cosine > 0.999, f"{name}: max excess over tolerance {excess:.3g}, cosine {cosine:.6f}"


@pytest.fixture(scope="module")
def engines(tiny_export_fp16, tmp_path_factory):
    from kvt.contract.profiles import Resolution
    from kvt.engines.builder import build_engines

    out = tmp_path_factory.mktemp("engines")
    result = build_engines(tiny_export_fp16, out, [Resolution(64, 64)], ["low", "high"], report=print)
    assert not any(s.reused for s in result.stages)
    return out


def test_second_build_reuses_every_plan(tiny_export_fp16, engines):
    from kvt.contract.profiles import Resolution
    from kvt.engines.builder import build_engines

    messages: list[str] = []
    again = build_engines(tiny_export_fp16, engines, [Resolution(64, 64)], ["low", "high"],
                          report=messages.append)
    assert all(s.reused for s in again.stages) and any("reusing" in m for m in messages)


def test_every_stage_matches_onnxruntime(tiny_export_fp16, engines):
    from kvt.contract.plan import request_plan
    from kvt.formats.export_dir import ExportManifest
    from kvt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from kvt.runtime.backends.tensorrt.backend import TensorRTBackend

    manifest = ExportManifest.read(tiny_export_fp16)
    reference = OnnxRuntimeBackend(tiny_export_fp16, device="cpu")
    backend = TensorRTBackend(engines, device="cuda")
    checked = set()
    calls = request_plan(64, 64, "high", with_image=False) + request_plan(64, 64, "low", with_image=True)
    for call in calls:
        spec = backend.table[call.stage]
        inputs = spec.sample_inputs(call.dims, seed=len(checked))
        want = reference.run(call.stage, inputs)
        got = backend.run(call.stage, {k: v.cuda() for k, v in inputs.items()})
        for name in spec.output_names:
            _close(f"{call.stage}{dict(call.dims)}.{name}", got[name], want[name],
                   manifest.stages[call.stage].compute_precision)
        checked.add(call.stage)
    assert checked == set(manifest.stages)
    backend.close()


def test_cuda_graph_replay_equals_plain_execution(engines):
    from kvt.runtime.backends.tensorrt.backend import TensorRTBackend

    plain = TensorRTBackend(engines, stages=["unet_t2v_video"])
    graphs = TensorRTBackend(engines, stages=["unet_t2v_video"], cuda_graphs=True)
    spec = plain.table["unet_t2v_video"]
    for seed in range(3):  # call 1 plain, call 2 captures, call 3 replays
        inputs = {k: v.cuda() for k, v in spec.sample_inputs({"N": 36, "h": 8, "w": 8}, seed=seed).items()}
        want = plain.run("unet_t2v_video", inputs)["eps"].clone()
        got = graphs.run("unet_t2v_video", inputs)["eps"]
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_pipeline_from_engines_generates(engines):
    from kvt.contract.request import GenerationRequest
    from kvt.runtime.pipeline import KandinskyVideoPipeline

    pipeline = KandinskyVideoPipeline.from_engines(engines)
    request = GenerationRequest(prompt="a red car", width=64, height=64, fps="low", seed=3,
                                key_frame_steps=2, base_frame_steps=2, interpolation_steps=2)
    output = pipeline.generate(request, progress=False)
    assert output.frames.shape == (12, 64, 64, 3)
