"""Triton serving against a real ``tritonserver`` (the one bundled in nvidia-pytriton) on loopback.

One server per module (``triton_server`` in conftest.py) serves the python-ort repository generated from
the tiny export (FP32). Its videos are compared with the in-process ONNX Runtime pipeline on the same
export, request and seed; bad requests must get errors that name the value while the server keeps serving; the
production configs (tensorrt_plan, onnxruntime_onnx) are parsed with Triton's model-config protobuf.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.triton

pytest.importorskip("onnxruntime")
pytest.importorskip("tritonclient.http")
pytest.importorskip("tritonclient.grpc")

from kvt.contract.plan import request_total_steps  # noqa: E402
from kvt.contract.request import GenerationRequest  # noqa: E402
from kvt.formats import triton_repo  # noqa: E402
from kvt.formats.triton_repo import RepositoryError  # noqa: E402
from kvt.runtime.pipeline import KandinskyVideoPipeline  # noqa: E402
from kvt.serving.client import TritonRequestError, TritonVideoClient  # noqa: E402
from kvt.serving.generator import configs  # noqa: E402
from kvt.serving.generator.repository import build_repository  # noqa: E402
from kvt.serving.local_server import TritonServer  # noqa: E402
from support.fake_pb_utils import FakePbUtils  # noqa: E402

STEPS = dict(key_frame_steps=3, base_frame_steps=3, interpolation_steps=2)


def _request(prompt: str = "a red fox in the snow", **kwargs) -> GenerationRequest:
    return GenerationRequest(prompt, **{"width": 64, "height": 64, "seed": 7, **STEPS, **kwargs})


def _image(width: int = 96, height: int = 80) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def assert_frames_match(served: np.ndarray, local: np.ndarray) -> None:
    """Same frames: exact, or within one uint8 level on a tiny fraction of the values."""
    assert served.dtype == np.uint8 and served.shape == local.shape
    diff = np.abs(served.astype(np.int16) - local.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (int(diff.max()), float((diff > 0).mean()))


# ------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def triton_repository(tmp_path_factory, tiny_export_fp32) -> Path:
    """The python-ort repository this module's server (``triton_server`` in conftest.py) serves."""
    out = tmp_path_factory.mktemp("triton") / "repo"
    return build_repository(out, tiny_export_fp32, options=configs.RepositoryOptions(triton_repo.PYTHON_ORT))


@pytest.fixture(scope="module")
def pipeline(tiny_export_fp32) -> KandinskyVideoPipeline:
    return KandinskyVideoPipeline.from_onnx(tiny_export_fp32, device="cpu")


def _client(server: TritonServer, protocol: str) -> TritonVideoClient:
    return TritonVideoClient(server.http_url if protocol == "http" else server.grpc_url, protocol, timeout=120)


# ------------------------------------------------------------------------------------ serving

def test_text_to_video_matches_in_process(triton_server, pipeline):
    request = _request()
    with _client(triton_server, "http") as client:
        video = client.generate(request)
    local = pipeline.generate(request, progress=False)
    assert video.frames.shape == (12, 64, 64, 3)
    assert video.seed == 7 and video.prompt_tokens == local.prompt_tokens and not video.prompt_truncated
    assert video.timings["server_total"] > 0
    assert_frames_match(video.frames, local.frames)


def test_image_to_video_matches_in_process(triton_server, pipeline):
    request = _request("a boat on a lake", image=_image(), motion="high", guidance_weight_image=3.3,
                       guidance_weight_prompt=6.7, interpolation_guidance_scale=0.3, seed=21)
    with _client(triton_server, "grpc") as client:
        video = client.generate(request)
    assert_frames_match(video.frames, pipeline.generate(request, progress=False).frames)


def _transparent(base: Image.Image, mode: str, under: int) -> Image.Image:
    """``base`` in ``mode`` (RGBA or LA) with a quarter of the pixels fully transparent and half partly
    so; the colour under the fully transparent ones is ``under`` (255 white, 0 black), as image editors
    store it."""
    pixels = np.array(base.convert(mode[:-1]))
    height, width = pixels.shape[:2]
    y, x = np.mgrid[0:height, 0:width]
    alpha = np.where(x < width // 4, 0, np.where(y < height // 2, 255, (x * 7 + y * 3) % 256)).astype(np.uint8)
    colour = pixels if pixels.ndim == 3 else pixels[..., None]
    colour = np.where((alpha == 0)[..., None], under, colour).astype(np.uint8)
    return Image.fromarray(np.concatenate([colour, alpha[..., None]], axis=-1), mode)


# The modes of item 3 of issue 16 (fidelity.md D1) and how each is made from the RGB gradient.
IMAGE_MODES = {
    "RGB": lambda image: image,
    "RGBA-white": lambda image: _transparent(image, "RGBA", 255),
    "RGBA-black": lambda image: _transparent(image, "RGBA", 0),
    "LA": lambda image: _transparent(image, "LA", 255),
    "P": lambda image: image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64),
    "L": lambda image: image.convert("L"),
    "CMYK": lambda image: image.convert("CMYK"),
}


@pytest.mark.parametrize("name", list(IMAGE_MODES))
def test_image_modes_match_in_process(triton_server, pipeline, name):
    """Every image mode through the real server gives the in-process frames: the client sends the image in
    its own mode (lossless bytes) and the server does the official preprocessing, resize before RGB."""
    from kvt.runtime.images import key_frame_image

    image = IMAGE_MODES[name](_image(97, 83))
    assert image.mode == name.split("-")[0]
    request = _request("a kite over a hill", image=image, seed=33)
    official = np.array(key_frame_image(image, 64, 64))
    rgb_first = np.array(key_frame_image(image.convert("RGB"), 64, 64))
    differing = float((official != rgb_first).any(axis=-1).mean())
    if name in ("RGBA-white", "RGBA-black", "LA", "P"):  # what the RGB-first client got wrong
        assert differing > 0.05, differing
    with _client(triton_server, "http") as client:
        video = client.generate(request)
    local = pipeline.generate(request, progress=False)
    print(f"{name}: conditioning pixels differing if converted to RGB first {differing:.1%}; served vs "
          f"in-process max |diff| {int(np.abs(video.frames.astype(int) - local.frames).max())}")
    assert_frames_match(video.frames, local.frames)


def test_streaming_reports_every_step(triton_server, pipeline):
    request = _request("a city at night", fps="medium", seed=5)
    steps = []
    with _client(triton_server, "grpc") as client:
        video = client.generate(request, progress=steps.append)
    assert len(steps) == request_total_steps(request) == 3 + 3 + 2
    assert [s.stage for s in steps] == ["key_frame"] * 3 + ["base_frames"] * 3 + ["interpolation"] * 2
    assert [s.done for s in steps] == list(range(1, len(steps) + 1))
    assert video.frames.shape == (45, 64, 64, 3)
    assert_frames_match(video.frames, pipeline.generate(request, progress=False).frames)
    with _client(triton_server, "grpc") as client:  # a refused streamed request ends the stream with the error
        with pytest.raises(TritonRequestError, match="fps='ultra' is not allowed"):
            client.generate(_request(fps="ultra"), progress=steps.append)


def test_server_picks_and_returns_a_seed(triton_server, pipeline):
    request = _request(seed=None)
    with _client(triton_server, "http") as client:
        video = client.generate(request)
    assert_frames_match(video.frames, pipeline.generate(request.with_seed(video.seed), progress=False).frames)


def test_text_encoding_ensemble(triton_server, pipeline):
    with _client(triton_server, "http") as client:
        encoded = client.encode_text("a red fox in the snow")
    local = pipeline.encode_prompt("a red fox in the snow")
    np.testing.assert_allclose(encoded["context"], local.context.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(encoded["attention_mask"], local.mask.numpy().astype(np.int32))
    assert float(encoded["context_len"].reshape(-1)[0]) == local.length


def test_concurrent_clients_get_their_own_videos(triton_server, pipeline):
    seeds = [101, 102, 103, 104, 105]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(index: int, seed: int) -> None:
        try:
            with _client(triton_server, "grpc" if index % 2 else "http") as client:
                results[seed] = client.generate(_request(f"scene number {index}", seed=seed)).frames
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, s)) for i, s in enumerate(seeds)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert sorted(results) == seeds
    for index, seed in enumerate(seeds):
        local = pipeline.generate(_request(f"scene number {index}", seed=seed), progress=False).frames
        assert_frames_match(results[seed], local)
    for a in seeds:
        for b in seeds:
            if a < b:
                assert not np.array_equal(results[a], results[b]), (a, b)


@pytest.mark.parametrize("arrays,expected", [
    ({"WIDTH": np.array([100], np.int32)}, ["width=100", "multiple of 64"]),
    ({"HEIGHT": np.array([1024], np.int32)}, ["height=1024", "[64, 256]"]),
    ({"FPS": np.array([b"ultra"], np.object_)}, ["fps='ultra'", "'low', 'medium', 'high'"]),
    ({"MOTION": np.array([b"wild"], np.object_)}, ["motion='wild'", "extreme"]),
    ({"PROMPT": None}, ["PROMPT", "required"]),
    ({"PROMPT": np.array([b"a\x00b"], np.object_)}, ["prompt=", "without NUL"]),
    ({"WIDTH": np.array([64.0], np.float32)}, ["WIDTH", "INT32"]),
    ({"KEY_FRAME_STEPS": np.array([0], np.int32)}, ["key_frame_steps=0", "[1, 1000]"]),
    ({"GUIDANCE_WEIGHT_PROMPT": np.array([np.nan])}, ["guidance_weight_prompt=nan", "finite"]),
    ({"GUIDANCE_WEIGHT_PROMPT": np.array([5.0], np.float32)}, ["GUIDANCE_WEIGHT_PROMPT", "FP64"]),
    ({"SEED": np.array([3, 4], np.int64)}, ["SEED", "Expected [1], got [2]"]),
    ({"IMAGE": np.zeros((8193, 1, 3), np.uint8)}, ["image=", "at most 8192 pixels per side"]),
])
def test_bad_request_gets_a_clear_error_and_the_server_keeps_serving(triton_server, arrays, expected):
    from kvt.serving.protocol import request_to_arrays

    base = request_to_arrays(_request(seed=1, key_frame_steps=1, base_frame_steps=1))
    sent = {k: v for k, v in {**base, **arrays}.items() if v is not None}
    with _client(triton_server, "http") as client:
        with pytest.raises(TritonRequestError) as caught:
            client.infer_arrays(sent)
        for part in expected:
            assert part in str(caught.value), str(caught.value)
        assert triton_server.is_alive()
        assert client.infer_arrays(base)["FRAMES"].shape == (12, 64, 64, 3)  # still serving


def test_generate_via_triton_writes_the_video(triton_server, tmp_path):
    import imageio.v3 as iio

    from kvt.serving.client import TritonVideoClient, generate_via_triton

    messages: list[str] = []  # what `kvt generate --triton` prints to stderr
    with TritonVideoClient(triton_server.grpc_url, "grpc") as client:
        out = generate_via_triton(client, _request(seed=3), tmp_path / "fox.gif", progress=True,
                                  report=lambda message, end="\n": messages.append(message))
    assert out == tmp_path / "fox.gif" and iio.imread(out, index=None).shape[0] == 12
    err = "\n".join(messages)
    assert "base_frames step 3/3" in err and "seed 3" in err
    with pytest.raises(TritonRequestError, match="no ready Triton server"), \
            TritonVideoClient("127.0.0.1:9", "http") as client:
        client.require_ready()
        generate_via_triton(client, _request(), tmp_path / "x.gif", progress=False)
    assert not (tmp_path / "x.gif").exists()


def test_kvt_generate_on_triton(triton_server, pipeline, tmp_path, capsys):
    """`kvt generate --triton` writes the same video as the in-process run; a bad value exits 2."""
    import imageio.v3 as iio

    from kvt.cli.main import EXIT_INVALID, EXIT_OK, main

    out = tmp_path / "served.mp4"
    steps = ["--key-frame-steps", "3", "--base-frame-steps", "3", "--interpolation-steps", "2"]
    assert main(["generate", "a red fox in the snow", "--out", str(out), "--triton", triton_server.grpc_url,
                 "--protocol", "grpc", "--seed", "7", *steps]) == EXIT_OK
    assert "base_frames step 3/3" in capsys.readouterr().err
    assert iio.imread(out, index=None).shape[:3] == (12, 64, 64)
    bad = tmp_path / "bad.mp4"
    assert main(["generate", "a cat", "--out", str(bad), "--triton", f"http://{triton_server.http_url}", "--width", "512",
                 "--no-progress"]) == EXIT_INVALID
    assert "width=512 is not allowed" in capsys.readouterr().err
    assert not bad.exists()


def test_triton_benchmark_against_the_real_server(triton_server):
    """`kvt bench triton`'s sender and concurrency harness, on this module's server."""
    from kvt.benchmarks.triton_bench import bench_concurrency, tritonclient_sender

    make_sender = tritonclient_sender(triton_server.grpc_url, "grpc", prompt="a fox", seed=7, width=64, height=64,
                                      fps="low", key_frame_steps=2, base_frame_steps=2, interpolation_steps=1)
    results = bench_concurrency(make_sender, levels=(1, 2), requests_per_worker=1, warmup=0)
    assert [(r.concurrency, r.requests) for r in results] == [(1, 1), (2, 2)]
    assert all(r.latency.median > 0 and r.throughput_rps > 0 for r in results)


def test_zz_shutdown_is_clean(triton_server):
    """Runs last in this module: the server stops on SIGTERM and leaves nothing in /dev/shm."""
    assert triton_server.is_alive()
    code = triton_server.stop()
    assert code == 0, triton_server.log_tail()
    assert not triton_server.is_alive() and triton_server.shm_leftovers() == []


# ------------------------------------------------------------------------------------ repositories

def test_protocol_covers_every_request_knob():
    from kvt.serving.protocol import arrays_to_request, request_to_arrays, uncovered_request_fields

    assert uncovered_request_fields() == set()
    request = _request("round trip", image=_image(), fps="high", motion="extreme", key_frame_guidance_scale=4.1,
                       guidance_weight_prompt=6.7, guidance_weight_image=0.3, interpolation_guidance_scale=0.7,
                       noise_augmentation=30, seed=2**40, key_frame_steps=9, base_frame_steps=8,
                       interpolation_steps=7)
    back = arrays_to_request(request_to_arrays(request), (64, 64))
    assert back.image.size == request.image.size and np.array_equal(np.asarray(back.image), np.asarray(request.image))
    assert {**vars(back), "image": None} == {**vars(request), "image": None}


def _parse(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


# Rows of independent requests may be batched (max of the table's first dim); the others may not. The
# U-Nets take one request's distinct contexts per call (not per row), so they are not batched either.
MAX_BATCH = {"text_encoder": 4, "unet_t2v_image": 0, "unet_t2v_video": 0, "movq_encoder": 4,
             "unet_interp": 0, "movq_decoder": 0, "video_movq_decoder": 0}


def _check_stage_configs(repo: Path, table, max_batch: dict[str, int] | None = None) -> None:
    expected = {**MAX_BATCH, **(max_batch or {})}
    for spec in table:
        config = _parse(repo / spec.name / "config.pbtxt")
        batched = expected[spec.name] > 0
        assert config.name == spec.name
        assert config.max_batch_size == expected[spec.name]
        for tensors, declared in ((spec.inputs, config.input), (spec.outputs, config.output)):
            assert [t.name for t in declared] == [t.name for t in tensors]
            for t, d in zip(tensors, declared):
                want = [e if isinstance(e, int) else -1 for e in t.shape][1 if batched else 0:] or [1]
                assert list(d.dims) == want and model_config_name(d.data_type) == t.dtype.triton
                assert d.HasField("reshape") == (batched and len(t.shape) == 1)
        assert config.HasField("dynamic_batching") == batched


def model_config_name(value: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(value)


def test_python_ort_configs_parse(triton_repository, tiny_export_fp32):
    from kvt.formats.export_dir import ExportManifest

    table = ExportManifest.read(tiny_export_fp32).stage_table()
    _check_stage_configs(triton_repository, table)
    for name in (triton_repo.TOKENIZER_MODEL, triton_repo.TEXT_ENCODING_MODEL, triton_repo.ORCHESTRATOR_MODEL,
                 triton_repo.STREAM_MODEL):
        config = _parse(triton_repository / name / "config.pbtxt")
        assert config.name == name
    assert _parse(triton_repository / triton_repo.STREAM_MODEL / "config.pbtxt").model_transaction_policy.decoupled
    assert (triton_repository / triton_repo.ORCHESTRATOR_MODEL / "1" / "null_embeddings.safetensors").is_file()
    assert (triton_repository / triton_repo.ORCHESTRATOR_MODEL / "1" / "tokenizer" / "spiece.model").is_file()


def test_onnxruntime_repository(tmp_path, tiny_export_fp32):
    from kvt.formats.export_dir import ExportManifest

    table = ExportManifest.read(tiny_export_fp32).stage_table()
    options = configs.RepositoryOptions(triton_repo.ONNXRUNTIME, placements={
        "unet_t2v_video": configs.Placement(2, (0, 1)), "video_movq_decoder": configs.Placement(1, (2,))})
    repo = build_repository(tmp_path / "repo", tiny_export_fp32, options=options)
    _check_stage_configs(repo, table)
    video = _parse(repo / "unet_t2v_video" / "config.pbtxt")
    assert video.platform == "onnxruntime_onnx" and video.default_model_filename == "model.onnx"
    group = video.instance_group[0]
    assert group.count == 2 and list(group.gpus) == [0, 1] and group.kind == group.KIND_GPU
    assert list(_parse(repo / "video_movq_decoder" / "config.pbtxt").instance_group[0].gpus) == [2]
    warmup = video.model_warmup[0]  # not batched: the whole call's shapes, the contexts once
    assert warmup.batch_size == 1 and list(warmup.inputs["sample"].dims) == [36, 9, 8, 8]
    assert list(warmup.inputs["context"].dims) == [2, 16, 32]
    assert not (repo / "unet_t2v_video" / "1" / "model.py").exists()
    assert (repo / "unet_t2v_video" / "1" / "model.onnx").is_file()
    orchestrator = _parse(repo / triton_repo.ORCHESTRATOR_MODEL / "config.pbtxt")
    assert orchestrator.parameters["device"].string_value == "cuda"


def _fake_engines(directory: Path, export: Path, table, ccs: list[str], versions: list[str],
                  profiles: dict | None = None) -> Path:
    from kvt.contract.profiles import profile_key, table_profiles
    from kvt.formats.engine_dir import BuildKey, EngineManifest, PlanEntry

    manifest = EngineManifest(onnx_dir=str(export), onnx_manifest={})
    for spec in table:
        entries = []
        for cc in ccs:
            for version in versions:
                plan = Path(spec.name) / f"{cc}-{version}.plan"
                (directory / plan).parent.mkdir(parents=True, exist_ok=True)
                (directory / plan).write_bytes(f"{spec.name} {cc} {version}".encode())
                # Default: the table's whole range, as `kvt build` without --resolution records it.
                key_profiles = (profiles or {}).get(spec.name, profile_key(table_profiles(spec)))
                key = BuildKey(spec.name, "0" * 64, key_profiles, "fp16", version, cc)
                entries.append(PlanEntry(str(plan), key, 10, "0" * 64))
        manifest.stages[spec.name] = entries
    manifest.write(directory)
    return directory


def test_tensorrt_repository_places_plans_per_gpu_arch(tmp_path, tiny_export_fp32):
    from kvt.formats.export_dir import ExportManifest

    table = ExportManifest.read(tiny_export_fp32).stage_table()
    engines = _fake_engines(tmp_path / "engines", tiny_export_fp32, table, ["8.9", "9.0"], ["10.3", "10.7"])
    options = configs.RepositoryOptions(triton_repo.TENSORRT)
    with pytest.raises(RepositoryError, match="--tensorrt-version"):
        build_repository(tmp_path / "repo", engines_dir=engines, options=options)
    assert not (tmp_path / "repo").exists() and not list(tmp_path.glob(".repo*"))
    with pytest.raises(RepositoryError, match="built with: \\['10.3', '10.7'\\]"):
        build_repository(tmp_path / "repo", engines_dir=engines, options=options, tensorrt_version="8.6")
    repo = build_repository(tmp_path / "repo", engines_dir=engines, options=options, tensorrt_version="10.7")
    _check_stage_configs(repo, table)
    config = _parse(repo / "unet_interp" / "config.pbtxt")
    assert config.platform == "tensorrt_plan"
    assert dict(config.cc_model_filenames) == {"8.9": "model_8.9.plan", "9.0": "model_9.0.plan"}
    assert (repo / "unet_interp" / "1" / "model_9.0.plan").read_bytes() == b"unet_interp 9.0 10.7"

    # Plans built for one request's batch (`kvt build --batch-range requests`) cap Triton's batching.
    one_request = {"unet_t2v_video": ((("N", 36, 36, 36), ("h", 8, 8, 8), ("w", 8, 8, 8)),),
                   "text_encoder": ((("B", 1, 1, 1),),)}
    single = _fake_engines(tmp_path / "single", tiny_export_fp32, table, ["9.0"], ["10.7"], one_request)
    repo = build_repository(tmp_path / "repo1", engines_dir=single, options=options)
    # A plan whose batch range starts above 1 (the video U-Net: 36 rows) keeps its batch in dims.
    _check_stage_configs(repo, table, {"unet_t2v_video": 0, "text_encoder": 1})
    config = _parse(repo / "text_encoder" / "config.pbtxt")
    assert config.default_model_filename == "model.plan" and not config.cc_model_filenames
    with pytest.raises(RepositoryError, match="already exists"):
        build_repository(tmp_path / "repo1", engines_dir=single, options=options)


def test_triton_repo_cli(tmp_path, tiny_export_fp32, capsys):
    from kvt.cli.main import EXIT_INVALID, EXIT_OK, main

    def run(*argv: str) -> int:
        return main(["triton-repo", *argv])

    out = tmp_path / "repo"
    assert run("--out", str(out), "--backend", "python-ort", "--onnx", str(tiny_export_fp32)) == EXIT_OK
    assert (out / triton_repo.ORCHESTRATOR_MODEL / "config.pbtxt").is_file()
    assert run("--out", str(out), "--backend", "python-ort", "--onnx", str(tiny_export_fp32)) == EXIT_INVALID
    assert "already exists" in capsys.readouterr().err
    assert run("--out", str(tmp_path / "r2"), "--backend", "onnxruntime", "--onnx", str(tiny_export_fp32),
               "--instances", "unet=2") == EXIT_INVALID
    assert "unknown model 'unet'" in capsys.readouterr().err
    assert run("--out", str(tmp_path / "r3"), "--backend", "tensorrt") == EXIT_INVALID
    assert "--engines" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()


def test_python_ort_stage_model_merges_batched_requests(triton_repository, pipeline, monkeypatch):
    """Requests the dynamic batcher delivers together run as one session call and are split again;
    each gets what the in-process backend computes for it alone."""
    import sys

    import torch
    from google.protobuf import json_format

    from kvt.serving.server_models import stage as stage_model

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", FakePbUtils)
    spec = pipeline.table["movq_encoder"]
    config = json_format.MessageToDict(_parse(triton_repository / spec.name / "config.pbtxt"),
                                       preserving_proto_field_name=True)
    assert int(config["max_batch_size"]) > 0
    model = stage_model.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_repository": str(triton_repository / spec.name),
                      "model_version": "1"})
    unsqueezed = triton_repo.unsqueezed_inputs(spec)
    calls = [spec.sample_inputs({"B": 1, "h": 8, "w": 8}, seed=seed) for seed in (1, 2, 3)]
    wire = [{name: FakePbUtils.Tensor(name, (t[:, None] if name in unsqueezed else t).numpy())
             for name, t in inputs.items()} for inputs in calls]
    responses = model.execute(wire)
    assert len(responses) == 3 and all(r.error is None for r in responses)
    for inputs, response in zip(calls, responses):
        local = pipeline.backend.run(spec.name, inputs)["latent"]
        torch.testing.assert_close(torch.from_numpy(response.outputs["latent"]), local, rtol=1e-4, atol=1e-5)
    bad = dict(wire[0], image=FakePbUtils.Tensor("image", np.zeros((1, 2, 64, 64), np.float32)))
    responses = model.execute([bad, wire[1]])  # one bad request does not fail its neighbour
    assert responses[0].error is not None and responses[1].error is None


def test_truncated_repository_file_is_named(tmp_path, tiny_export_fp32):
    from kvt.formats.triton_repo import verify_repository

    repo = build_repository(tmp_path / "repo", tiny_export_fp32,
                            options=configs.RepositoryOptions(triton_repo.PYTHON_ORT))
    record = verify_repository(repo, check_hashes=True)
    assert "unet_t2v_video/1/model.onnx" in record["files"]
    config = repo / "unet_t2v_video" / "config.pbtxt"
    config.write_text(config.read_text() + "\n# tuned by hand\n")  # configs may be edited
    verify_repository(repo)
    onnx = repo / "unet_t2v_video" / "1" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-100])
    with pytest.raises(RepositoryError, match=r"unet_t2v_video/1/model.onnx: \d+ bytes, kvt_repository.json "
                                              r"records \d+: truncated"):
        verify_repository(repo)
