"""TensorRT plans of the tiny export on a GPU: what only a GPU shows (needs TensorRT >= 10.12 and CUDA).

Builds every stage of the fp16 export (strongly typed: FP16 U-Nets, BF16-weight T5, FP32 MoVQs) for
64x64 and fps low + high (so the interpolation U-Net gets its two profiles), then checks:

* every stage against ONNX Runtime on the CPU at the min, opt and max of every profile of its plan,
  polygraphy-style, with FP16 tolerances;
* CUDA graphs: replays equal plain execution for the video U-Net and the two-profile interpolation
  U-Net; a capture whose enqueue returns False (TensorRT's "not capturable") and an empty graph both
  end in uncaptured execution with correct outputs, never in a stored graph;
* fused attention, seen through the engine inspector of a plan built with detailed profiling: no
  attention Softmax of the U-Nets is left as a layer of its own;
* activation memory per profile: what ``update_device_memory_size_for_shapes`` asks for the shapes in
  use is within the plan's ``device_memory_size_v2``, and the shared buffer grows to the calls' largest;
* the cache reuses every plan on a second build; ``KandinskyVideoPipeline.from_engines`` generates.

One command in an NGC TensorRT container: ``pytest -m tensorrt tests/test_tensorrt_engines.py -q``.
Skips with the reason when TensorRT or a GPU is missing (the case on this project's CPU machines).
"""

from __future__ import annotations

import json

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
# stages: TensorRT may use TF32 for FP32 convolutions and matmuls (its default). BF16 text encoder:
# BF16 GEMMs against ONNX Runtime's FP32.
TOLERANCES = {"fp16": (3e-2, 3e-2), "fp32": (1e-2, 1e-2), "bf16": (5e-2, 5e-2)}  # (rtol, atol)
RESOLUTION, FPS = "64x64", ("low", "high")


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
    from kvt.contract.profiles import parse_resolution
    from kvt.engines.builder import build_engines

    out = tmp_path_factory.mktemp("engines")
    result = build_engines(tiny_export_fp16, out, [parse_resolution(RESOLUTION)], FPS, report=print)
    assert not any(s.reused for s in result.stages) and result.memory is not None
    return out


def _profile_dims(entry) -> list[dict[str, dict[str, int]]]:
    """Per profile of a plan's key: {"min": dims, "opt": dims, "max": dims}."""
    out = []
    for profile in entry.key.profiles:
        out.append({label: {dim: values[i] for dim, *values in profile} for i, label in enumerate(("min", "opt", "max"))})
    return out


def test_second_build_reuses_every_plan(tiny_export_fp16, engines):
    from kvt.contract.profiles import parse_resolution
    from kvt.engines.builder import build_engines

    messages: list[str] = []
    again = build_engines(tiny_export_fp16, engines, [parse_resolution(RESOLUTION)], FPS, report=messages.append)
    assert all(s.reused for s in again.stages) and any("reusing" in m for m in messages)


def test_every_stage_matches_onnxruntime_at_min_opt_max(tiny_export_fp16, engines):
    from kvt.formats.engine_dir import EngineManifest
    from kvt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from kvt.runtime.backends.tensorrt.backend import TensorRTBackend

    manifest = EngineManifest.read(engines)
    reference = OnnxRuntimeBackend(tiny_export_fp16, device="cpu")
    backend = TensorRTBackend(engines, device="cuda")
    checked = []
    for stage in backend.stages:
        entry = manifest.stages[stage][-1]
        spec = backend.table[stage]
        for index, profile in enumerate(_profile_dims(entry)):
            for label, dims in profile.items():
                inputs = spec.sample_inputs(dims, seed=len(checked))
                want = reference.run(stage, inputs)
                got = backend.run(stage, {k: v.cuda() for k, v in inputs.items()})
                for name in spec.output_names:
                    _close(f"{stage}[profile {index} {label} {dims}].{name}", got[name], want[name],
                           entry.key.precision)
                checked.append((stage, index, label))
    assert {s for s, _, _ in checked} == set(manifest.stages)
    backend.close()


@pytest.mark.parametrize("stage,dims_list", [
    ("unet_t2v_video", [{"N": 36, "h": 8, "w": 8}]),
    ("unet_interp", [{"N": 22, "h": 8, "w": 8}, {"N": 88, "h": 8, "w": 8}]),  # both profiles
])
def test_cuda_graph_replays_equal_plain_execution(engines, stage, dims_list):
    from kvt.runtime.backends.tensorrt.backend import TensorRTBackend

    plain = TensorRTBackend(engines, stages=[stage])
    graphs = TensorRTBackend(engines, stages=[stage], cuda_graphs=True)
    spec = plain.table[stage]
    for dims in dims_list:
        for seed in range(4):  # call 1 plain, call 2 warm-up + capture + checked replay, 3-4 replay
            inputs = {k: v.cuda() for k, v in spec.sample_inputs(dims, seed=seed).items()}
            want = plain.run(stage, inputs)[spec.output_names[0]].clone()
            got = graphs.run(stage, inputs)[spec.output_names[0]]
            torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)  # same plan; tactics may not be bitwise
        binding = graphs._engines[stage]._bindings[tuple(
            (t.name, tuple(t.concrete_shape(dims))) for t in spec.inputs)]
        assert binding.graph is not None and not binding.graph_failed, f"{stage} {dims}: no graph was kept"
    plain.close()
    graphs.close()


@pytest.mark.parametrize("failure", ["enqueue returns False", "empty graph"])
def test_a_failed_capture_falls_back_to_uncaptured_execution(engines, failure, caplog):
    from kvt.runtime.backends.tensorrt.backend import TensorRTBackend
    from kvt.runtime.backends.tensorrt.runner import TorchGraphCapture

    class Failing(TorchGraphCapture):
        def capture(self, enqueue, stream):
            if failure == "empty graph":
                return super().capture(lambda handle: True, stream)  # captures nothing
            return super().capture(lambda handle: bool(enqueue(handle)) and False, stream)

    stage = "unet_t2v_video"
    plain = TensorRTBackend(engines, stages=[stage])
    graphs = TensorRTBackend(engines, stages=[stage], cuda_graphs=True)
    engine = graphs._engines[stage]
    engine._graphs = Failing(engine.device)
    spec = plain.table[stage]
    for seed in range(4):
        inputs = {k: v.cuda() for k, v in spec.sample_inputs({"N": 36, "h": 8, "w": 8}, seed=seed).items()}
        want = plain.run(stage, inputs)["eps"].clone()
        got = graphs.run(stage, inputs)["eps"]
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)
    binding = next(iter(engine._bindings.values()))
    assert binding.graph is None and binding.graph_failed
    assert "running this shape without a CUDA graph" in caplog.text
    plain.close()
    graphs.close()


def test_unet_attention_is_fused(tiny_export_fp16):
    """The engine inspector of a plan built with detailed profiling: no attention Softmax of the U-Net
    is a layer of its own (an unfused attention keeps BMM1, Softmax and BMM2 as separate layers)."""
    import onnx

    from kvt.engines.builder import BuildOptions, build_plan
    from kvt.engines.static_checks import Graph, attention_sites
    from kvt.formats.export_dir import ExportManifest
    from kvt.runtime.backends.tensorrt.runner import Engine

    trt = import_tensorrt()
    table = ExportManifest.read(tiny_export_fp16).stage_table()
    spec = table["unet_t2v_image"]
    path = tiny_export_fp16 / "unet_t2v_image.onnx"
    softmaxes = {site.softmax for site in attention_sites(Graph(onnx.load(str(path), load_external_data=False)))}
    assert softmaxes
    built = build_plan(trt, path, spec, spec.profiles, BuildOptions(detailed_profiling=True))
    info = Engine(built.plan, spec, "cuda").layer_information()
    layers = info.get("Layers", [])
    assert layers, json.dumps(info)[:2000]
    text = json.dumps(layers)
    standalone = [layer for layer in layers if isinstance(layer, dict)
                  and str(layer.get("LayerType", "")).lower() == "softmax"]
    named = [name for name in softmaxes if f'"{name}"' in text]
    assert not standalone and not named, f"unfused softmax layers: {standalone[:3] or named[:3]}"


def test_activation_memory_follows_the_profile_in_use(engines):
    from kvt.runtime.backends.tensorrt.backend import TensorRTBackend

    backend = TensorRTBackend(engines, stages=["unet_interp"])
    engine = backend._engines["unet_interp"]
    spec = backend.table["unet_interp"]
    assert backend.arena.nbytes == 0  # nothing reserved for the largest profile up front
    backend.run("unet_interp", {k: v.cuda() for k, v in spec.sample_inputs({"N": 22, "h": 8, "w": 8}).items()})
    small = backend.arena.nbytes
    backend.run("unet_interp", {k: v.cuda() for k, v in spec.sample_inputs({"N": 88, "h": 8, "w": 8}).items()})
    large = backend.arena.nbytes
    assert 0 < small <= large <= engine.max_activation_bytes
    print(f"unet_interp activation memory: N=22 {small} B, N=88 {large} B, plan max {engine.max_activation_bytes} B")
    backend.close()


def test_pipeline_from_engines_generates(engines):
    from kvt.contract.request import GenerationRequest
    from kvt.runtime.pipeline import KandinskyVideoPipeline

    pipeline = KandinskyVideoPipeline.from_engines(engines)
    request = GenerationRequest(prompt="a red car", width=64, height=64, fps="low", seed=3,
                                key_frame_steps=2, base_frame_steps=2, interpolation_steps=2)
    output = pipeline.generate(request, progress=False)
    assert output.frames.shape == (12, 64, 64, 3)
