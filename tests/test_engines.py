"""kvt.engines without TensorRT: profiles, cache keys, the engine manifest, the build flow and its
error paths, `kvt build` / `kvt doctor`.

Where a build or a backend load is exercised, ``FakeTensorRT`` (tests/support/fake_tensorrt.py) stands in
for the TensorRT library only (it records what it is asked and returns bytes instead of plans);
everything else (the tiny FP16 export, ONNX files read with ``onnx``, the cache, the CLI) is real. The real library is exercised
by tests/test_tensorrt_engines.py on a GPU machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from kvt.cli.common import parse_size
from kvt.cli.main import EXIT_FAILURE, EXIT_INVALID, EXIT_OK, main
from kvt.contract.errors import UserError
from kvt.contract.profiles import (
    ProfileError,
    Resolution,
    input_shapes,
    parse_fps_modes,
    parse_resolution,
    profile_key,
    request_profiles,
    select_profiles,
)
from kvt.contract.stages import Dim
from kvt.engines import builder as builder_mod
from kvt.engines.builder import BuildOptions, EngineBuildError, OnnxParseError, build_engines
from kvt.formats.engine_cache import EngineCache, PlanIntegrityError, StalePlanError, make_key, onnx_digest
from kvt.formats.engine_dir import ANY_DEVICE, EngineManifest, EngineManifestError, PlanTarget
from kvt.formats.export_dir import ExportManifestError
from kvt.models.presets import get_preset
from kvt.models.stage_modules import stage_table_for
from kvt.runtime.backends.tensorrt.runner import choose_profile, torch_dtype
from kvt.runtime.backends.tensorrt.trt_env import GpuInfo, TensorRTUnavailable, import_tensorrt, require_gpu
from support.fake_tensorrt import FakeTensorRT

TINY = stage_table_for(get_preset("tiny").config)  # resolution 64 / 64 / 256
FULL = stage_table_for(get_preset("full").config)  # resolution 256 / 512 / 1024
GPU_A = GpuInfo(0, "Fake GPU A", "9.0", 80 * 2**30, 132)
GPU_B = GpuInfo(0, "Fake GPU B", "8.6", 24 * 2**30, 84)
TARGET = PlanTarget("10.13.0.35", "9.0", "NVIDIA H100 80GB HBM3", 132)


def dims(profile) -> dict[str, tuple[int, int, int]]:
    return {name: (d.min, d.opt, d.max) for name, d in profile.items()}


# ------------------------------------------------------------------------------------- profiles

@pytest.mark.parametrize("text,expected", [("512x512", (512, 512)), ("640x384", (640, 384)),
                                           (" 64 X 128 ", (64, 128))])
def test_parse_resolution(text, expected):
    res = parse_resolution(text)
    assert (res.width, res.height) == expected and str(res) == f"{expected[0]}x{expected[1]}"


@pytest.mark.parametrize("text,message", [("512", "WIDTHxHEIGHT"), ("512x500", "height 500"),
                                          ("0x512", "width 0"), ("axb", "WIDTHxHEIGHT")])
def test_parse_resolution_rejects(text, message):
    with pytest.raises(ProfileError, match=message):
        parse_resolution(text)


def test_parse_fps_modes():
    assert parse_fps_modes(["high", "low", "high"]) == ("high", "low")
    with pytest.raises(ProfileError, match="'ultra'.*low, medium, high"):
        parse_fps_modes(["ultra"])


def test_without_resolution_the_table_ranges_are_built():
    chosen = select_profiles(FULL)
    assert list(chosen) == list(FULL.names)
    for name, profiles in chosen.items():
        assert [dims(p) for p in profiles] == [dims(p) for p in FULL[name].profiles]
    assert [dims(p)["N"] for p in chosen["unet_interp"]] == [(4, 22, 88), (4, 88, 88)]


def test_fps_modes_alone_drop_stages_nobody_calls():
    assert "unet_interp" not in select_profiles(FULL, fps_modes=["low"])
    assert "unet_interp" in select_profiles(FULL, fps_modes=["low", "medium"])


def test_request_profiles_512_low():
    chosen = request_profiles(FULL, [Resolution(512, 512)], ["low"])
    assert "unet_interp" not in chosen  # fps low never interpolates
    assert dims(chosen["unet_t2v_video"][0]) == {"N": (36, 36, 36), "h": (64, 64, 64), "w": (64, 64, 64)}
    assert dims(chosen["unet_t2v_image"][0]) == {"N": (2, 2, 2), "h": (128, 128, 128), "w": (128, 128, 128)}
    assert dims(chosen["movq_decoder"][0]) == {"h": (128, 128, 128), "w": (128, 128, 128)}
    assert dims(chosen["video_movq_decoder"][0])["F"] == (4, 4, 4)  # 12 frames: chunks of 4
    assert dims(chosen["text_encoder"][0]) == {"B": (1, 1, 1)}


def test_request_profiles_high_fps_gives_the_two_interpolation_profiles():
    chosen = request_profiles(FULL, [Resolution(512, 512)], ["medium", "high"])
    assert [dims(p)["N"] for p in chosen["unet_interp"]] == [(22, 22, 22), (88, 88, 88)]
    # 45 frames: 9 chunks of 5; 177 frames: 35 of 5 and one of 2 -> opt is the common 5
    assert dims(chosen["video_movq_decoder"][0])["F"] == (2, 5, 5)


def test_request_profiles_envelope_and_opt_from_the_first_resolution():
    chosen = request_profiles(FULL, [Resolution(640, 384), Resolution(512, 512), Resolution(256, 256)], ["low"])
    video = dims(chosen["unet_t2v_video"][0])
    assert video["h"] == (32, 48, 64) and video["w"] == (32, 80, 80)
    assert dims(chosen["movq_encoder"][0])["w"] == (32, 80, 80)


def test_table_batch_keeps_the_table_batch_range():
    chosen = request_profiles(FULL, [Resolution(512, 512)], ["high"], table_batch=True)
    assert [dims(p)["N"] for p in chosen["unet_interp"]] == [(4, 22, 88), (4, 88, 88)]
    assert dims(chosen["unet_interp"][0])["h"] == (64, 64, 64)  # spatial stays tight
    assert dims(chosen["text_encoder"][0])["B"] == (1, 1, 4)


def test_request_profiles_errors():
    with pytest.raises(ProfileError, match=r"1280x512: width 1280 is outside the export's range \[256, 1024\]"):
        request_profiles(FULL, [Resolution(1280, 512)], ["low"])
    with pytest.raises(ProfileError, match="at least one resolution"):
        request_profiles(FULL, [], ["low"])
    with pytest.raises(KeyError, match="unknown stage 'nope'"):
        select_profiles(FULL, stages=["nope"])


def test_request_profiles_for_a_subset_of_stages_and_default_fps():
    # No fps given: every fps mode (README, `kvt build --fps`), so the interpolation U-Net is built too;
    # fps low alone never calls it.
    chosen = select_profiles(TINY, [Resolution(64, 64)], [], stages=["unet_t2v_video", "unet_interp"])
    assert list(chosen) == ["unet_t2v_video", "unet_interp"]
    low = select_profiles(TINY, [Resolution(64, 64)], ["low"], stages=["unet_t2v_video", "unet_interp"])
    assert list(low) == ["unet_t2v_video"]


def test_input_shapes_scale_symbols_and_skip_static_inputs():
    spec = FULL["movq_encoder"]
    profile = {"B": Dim(1, 1, 4), "h": Dim(32, 64, 128, 8), "w": Dim(32, 64, 128, 8)}
    assert input_shapes(spec, profile) == {"image": ((1, 3, 256, 256), (1, 3, 512, 512), (4, 3, 1024, 1024))}
    interp = input_shapes(FULL["unet_interp"], FULL["unet_interp"].profiles[1])
    assert interp["sample"][1] == (88, 20, 64, 64) and interp["temporal_mask"][2] == (88,)
    assert "context" not in interp  # static [2, 128, 4096]: no profile entry (one copy per call)
    with pytest.raises(ProfileError, match="no dim '8h' of input 'image'"):
        input_shapes(spec, {"B": Dim(1, 1, 1)})


def test_profile_key_is_sorted_and_hashable():
    key = profile_key([{"w": Dim(1, 2, 3), "N": Dim(4, 5, 6)}])
    assert key == ((("N", 4, 5, 6), ("w", 1, 2, 3)),)
    hash(key)


def test_choose_profile_prefers_the_nearest_opt():
    ranges = [{"x": ((4, 1), (22, 1), (88, 1))}, {"x": ((4, 1), (88, 1), (88, 1))}]
    assert choose_profile(ranges, {"x": (22, 1)}) == 0
    assert choose_profile(ranges, {"x": (80, 1)}) == 1
    assert choose_profile(ranges, {"x": (90, 1)}) is None
    assert choose_profile(ranges, {"x": (22, 1), "static": (3,)}) == 0


def test_torch_dtype_of_trt_names():
    assert torch_dtype(FakeTensorRT.DataType.HALF) is torch.float16
    assert torch_dtype(FakeTensorRT.DataType.BOOL) is torch.bool


# ------------------------------------------------------------------------------------- cache

PROFILES = ({"N": Dim(2, 2, 2)},)


def _key(**changes):
    key = make_key("unet_t2v_image", "a" * 64, PROFILES, "fp16", "10.13.0.35", "9.0", 3,
                   "NVIDIA H100 80GB HBM3", 132)
    return dataclasses.replace(key, **changes) if changes else key


@pytest.mark.parametrize("field,value", [("stage", "unet_t2v_video"), ("onnx_sha256", "b" * 64),
                                         ("profiles", profile_key(({"N": Dim(2, 2, 4)},))),
                                         ("precision", "fp32"), ("tensorrt_version", "11.0.0"),
                                         ("compute_capability", "8.9"), ("builder_optimization_level", 5),
                                         ("device", "NVIDIA H200"), ("sm_count", 114)])
def test_key_digest_changes_with_every_field(field, value):
    assert _key().digest() == _key().digest()
    assert _key(**{field: value}).digest() != _key().digest()


def test_make_key_rejects_bad_values():
    with pytest.raises(ValueError, match="optimisation level 7"):
        make_key("s", "x", PROFILES, "fp16", "10", "9.0", 7)
    with pytest.raises(ValueError, match="at least one optimisation profile"):
        make_key("s", "x", (), "fp16", "10", "9.0")


def test_onnx_digest_covers_external_data():
    one = onnx_digest({"a.onnx": {"sha256": "1"}})
    two = onnx_digest({"a.onnx": {"sha256": "1"}, "a.onnx.data": {"sha256": "2"}})
    assert one != two and one == onnx_digest({"a.onnx": {"sha256": "1", "bytes": 9}})
    with pytest.raises(EngineManifestError, match="records no files"):
        onnx_digest({})


def _cache(tmp_path, model=None) -> EngineCache:
    cache = EngineCache(tmp_path / "engines")
    cache.open_for("/exports/x", {"model": model or {"tokens_length": 16}, "precision": "fp16", "options": {}})
    return cache


def test_store_lookup_reuse_and_integrity(tmp_path):
    cache = _cache(tmp_path)
    key = _key()
    assert cache.lookup(key) is None
    entry = cache.store(key, b"plan-bytes", 1.23456)
    assert entry.plan == f"unet_t2v_image/{key.digest()}.plan" and entry.bytes == 10
    assert cache.lookup(key) == entry and cache.lookup(key, verify_hash=True) == entry
    assert cache.lookup(_key(precision="fp32")) is None
    assert cache.read_plan(entry) == b"plan-bytes"
    # no temporary file is left behind by the atomic writes
    assert sorted(p.name for p in (cache.directory / "unet_t2v_image").iterdir()) == [f"{key.digest()}.plan"]
    assert not [p for p in cache.directory.iterdir() if p.name.startswith(".manifest")]
    assert entry.fingerprint and entry.sha256 != entry.fingerprint
    # same size, other content: the fingerprint (head and tail) checked on every load notices
    cache.plan_path(entry).write_bytes(b"PLAN-BYTES")
    assert cache.lookup(key) == entry and cache.lookup(key, verify_hash=True) is None
    with pytest.raises(PlanIntegrityError, match="content differs from the manifest"):
        cache.read_plan(entry)
    with pytest.raises(PlanIntegrityError, match="SHA-256 differs"):
        cache.verify(entry)
    cache.plan_path(entry).write_bytes(b"short")
    assert cache.lookup(key) is None
    with pytest.raises(PlanIntegrityError, match="5 bytes, the manifest records 10"):
        cache.check_file(entry)
    cache.plan_path(entry).unlink()
    with pytest.raises(PlanIntegrityError, match="missing"):
        cache.read_plan(entry)


def test_store_replaces_the_older_plan_for_the_same_gpu_and_version(tmp_path):
    cache = _cache(tmp_path)
    first = cache.store(_key(), b"one")
    other_gpu = cache.store(_key(compute_capability="8.6"), b"two")
    newer = cache.store(_key(onnx_sha256="c" * 64), b"three")
    plans = cache.manifest().stages["unet_t2v_image"]
    assert plans == [other_gpu, newer]
    assert not cache.plan_path(first).exists() and cache.plan_path(other_gpu).exists()


def test_select_never_returns_a_plan_of_another_gpu_or_version(tmp_path):
    cache = _cache(tmp_path)
    entry = cache.store(_key(), b"plan")
    assert cache.select("unet_t2v_image", TARGET) == entry
    with pytest.raises(StalePlanError, match=r"built for TensorRT 10.13.0.35 on NVIDIA H100 80GB HBM3 \(132 SMs, "
                                             r"compute capability 9.0\); this machine has TensorRT 10.13.0.35 on "
                                             r"Fake \(84 SMs, compute capability 8.6\)"):
        cache.select("unet_t2v_image", PlanTarget("10.13.0.35", "8.6", "Fake", 84))
    with pytest.raises(StalePlanError, match="rebuild it here with `kvt build --onnx /exports/x"):
        cache.select("unet_t2v_image", dataclasses.replace(TARGET, tensorrt_version="11.0.0"))
    with pytest.raises(EngineManifestError, match="no plan for stage 'movq_decoder'"):
        cache.select("movq_decoder", TARGET)


def test_an_h100_plan_is_not_an_h200_plan_but_a_same_compute_capability_plan_runs_on_both(tmp_path):
    cache = _cache(tmp_path)
    h100 = cache.store(_key(), b"h100 plan")
    h200 = PlanTarget("10.13.0.35", "9.0", "NVIDIA H200", 132)
    with pytest.raises(StalePlanError, match="NVIDIA H100 80GB HBM3.*this machine has TensorRT 10.13.0.35 on NVIDIA H200"):
        cache.select("unet_t2v_image", h200)
    with pytest.raises(StalePlanError):  # same model name, other SM count (a cut-down part)
        cache.select("unet_t2v_image", dataclasses.replace(TARGET, sm_count=114))
    anywhere = cache.store(_key(device=ANY_DEVICE, sm_count=0), b"same-cc plan")
    assert cache.select("unet_t2v_image", h200) == anywhere
    assert cache.select("unet_t2v_image", TARGET) == h100  # the GPU's own plan first
    with pytest.raises(StalePlanError):  # other compute capability: not even a same-cc plan
        cache.select("unet_t2v_image", dataclasses.replace(TARGET, compute_capability="8.9"))


def test_open_for_refuses_plans_of_another_export(tmp_path):
    cache = _cache(tmp_path)
    cache.store(_key(), b"plan")
    again = cache.open_for("/exports/y", {"model": {"tokens_length": 16}, "precision": "fp16", "options": {}})
    assert again.onnx_dir == "/exports/y" and again.stages  # same model: plans kept
    other = {"model": {"tokens_length": 128}, "precision": "fp16", "options": {}}
    with pytest.raises(EngineManifestError, match="holds plans of another export"):
        cache.open_for("/exports/z", other)
    assert cache.open_for("/exports/z", other, overwrite=True).stages == {}
    with pytest.raises(EngineManifestError, match="call open_for"):
        EngineCache(tmp_path / "fresh").store(_key(), b"x")


def test_manifest_round_trip_and_errors(tmp_path):
    cache = _cache(tmp_path)
    cache.store(_key(), b"p")
    cache.store(_key(compute_capability="8.6"), b"q")
    manifest = EngineManifest.read(cache.directory)
    assert [p.key.compute_capability for p in manifest.stages["unet_t2v_image"]] == ["9.0", "8.6"]
    target = dataclasses.replace(TARGET, compute_capability="8.6")
    assert manifest.plans_for("unet_t2v_image", target)[0].sha256 == cache.manifest().stages[
        "unet_t2v_image"][1].sha256
    (cache.directory / "manifest.json").write_text("{nope")
    with pytest.raises(EngineManifestError, match="not valid JSON"):
        EngineManifest.read(cache.directory)
    with pytest.raises(EngineManifestError, match="no manifest.json"):
        EngineManifest.read(tmp_path)


def test_timing_cache_per_tensorrt_version_and_gpu(tmp_path):
    cache = _cache(tmp_path)
    path = cache.timing_cache_path("10.13.0.35", "NVIDIA H100 80GB HBM3")
    assert path.name == "timing-10.13.0.35-NVIDIA-H100-80GB-HBM3.cache"
    assert path != cache.timing_cache_path("10.13.0.35", "NVIDIA H200")
    assert path != cache.timing_cache_path("10.12.0.36", "NVIDIA H100 80GB HBM3")
    assert cache.load_timing_cache(path) == b""
    cache.save_timing_cache(b"timings", path)
    assert cache.load_timing_cache(path) == b"timings"


def test_open_for_refuses_another_checkpoints_plans(tmp_path):
    cache = EngineCache(tmp_path / "engines")
    summary = {"model": {"tokens_length": 16}, "precision": "fp16", "options": {}, "source_digest": "a" * 64}
    cache.open_for("/exports/a", summary)
    cache.store(_key(), b"plan")
    with pytest.raises(EngineManifestError, match="holds plans of another export.*weights aaaaaaaaaaaa.*weights bbbbbbbbbbbb"):
        cache.open_for("/exports/b", {**summary, "source_digest": "b" * 64})


def test_parse_size():
    assert parse_size("8GiB") == 8 * 2**30 and parse_size("512M") == 512 * 2**20 and parse_size("100") == 100
    with pytest.raises(ValueError, match="size 'lots'"):
        parse_size("lots")


# ------------------------------------------------------------------------------------- the fake library

@pytest.fixture
def fake_trt(monkeypatch):
    for name, value in (("builds", 0), ("fail_parse", []), ("fail_build", False), ("last_flags", None),
                        ("reject_timing_cache", False), ("refuse_capture", False), ("capturing", False),
                        ("executions", 0), ("last_config", None)):
        monkeypatch.setattr(FakeTensorRT, name, value)
    return FakeTensorRT


@pytest.fixture(scope="module")
def export_dir(tiny_export_fp16) -> Path:
    return tiny_export_fp16


def _build(export_dir, out, trt, messages, **kwargs):
    kwargs.setdefault("resolutions", [Resolution(64, 64)])
    kwargs.setdefault("fps_modes", ["low"])
    return build_engines(export_dir, out, report=messages.append, trt=trt, gpu=kwargs.pop("gpu", GPU_A), **kwargs)


TIMING = "timing-10.13.0.35-Fake-GPU-A.cache"


def test_build_then_reuse(export_dir, tmp_path, fake_trt):
    out, messages = tmp_path / "engines", []
    result = _build(export_dir, out, fake_trt, messages, options=BuildOptions(workspace_bytes=2**30))
    built = [s.stage for s in result.stages]
    assert "unet_interp" not in built and result.skipped == ["unet_interp"]  # fps low
    assert fake_trt.builds == len(built) == 6 and not any(s.reused for s in result.stages)
    assert fake_trt.last_flags == 1 << 1  # STRONGLY_TYPED, nothing else
    manifest = EngineManifest.read(out)
    entry = manifest.stages["unet_t2v_video"][0]
    assert entry.key.precision == "fp16" and manifest.stages["movq_encoder"][0].key.precision == "fp32"
    assert manifest.stages["text_encoder"][0].key.precision == "bf16"  # the FP32 T5 graph, BF16 weights
    assert entry.key.compute_capability == "9.0" and entry.key.tensorrt_version == "10.13.0.35"
    assert (entry.key.device, entry.key.sm_count) == ("Fake GPU A", 132)
    plan = json.loads((out / entry.plan).read_bytes())
    assert plan["level"] == 3 and plan["pools"] == {"WORKSPACE": 2**30}
    assert plan["preview"] == {"RUNTIME_ACTIVATION_RESIZE_10_10": True} and plan["hardware"] == "NONE"
    assert plan["profiles"][0]["sample"] == [[36, 9, 8, 8]] * 3
    assert (out / "tokenizer").is_dir() and (out / "null_embeddings.safetensors").is_file()
    assert (out / TIMING).is_file() and not (out / "timing.cache").exists()
    assert not [p for p in out.iterdir() if ".bf16-" in p.name]  # the rewritten T5 graph is gone
    assert any("unet_t2v_video: building (fp16 plan of the fp16 graph, strongly typed" in m for m in messages)
    assert any("text_encoder: building (bf16 plan of the fp32 graph" in m for m in messages)
    assert any(m.startswith("memory plan (computed, not measured)") for m in messages)
    assert any(m.startswith("memory plan for Triton (activations per model, STATIC)") for m in messages)
    assert result.memory is not None and result.memory.fits("tensorrt")
    assert set(result.checks) == set(built) and all(r.ok for r in result.checks.values())

    messages.clear()
    again = _build(export_dir, out, fake_trt, messages)
    assert fake_trt.builds == 6 and all(s.reused for s in again.stages)
    assert any(m.startswith("unet_t2v_video: reusing") for m in messages)

    # another resolution -> other profiles -> a rebuild of every stage that depends on it
    _build(export_dir, out, fake_trt, [], resolutions=[Resolution(128, 128)], stages=["unet_t2v_video"])
    assert fake_trt.builds == 7
    _build(export_dir, out, fake_trt, [], stages=["unet_t2v_video"], options=BuildOptions(force=True))
    assert fake_trt.builds == 8
    # the timing cache saved by one build is what the next one loads
    assert fake_trt.last_timing_cache == (out / TIMING).read_bytes()[:-1]


def test_build_for_another_gpu_keeps_both_and_the_backend_refuses_the_stale_one(export_dir, tmp_path, fake_trt):
    out = tmp_path / "engines"
    _build(export_dir, out, fake_trt, [], gpu=GPU_B, stages=["movq_encoder"])
    from kvt.runtime.backends.tensorrt.backend import TensorRTBackend

    with pytest.raises(StalePlanError, match=r"Fake GPU B \(84 SMs, compute capability 8.6\); this machine has "
                                             r"TensorRT 10.13.0.35 on Fake GPU A \(132 SMs, compute capability 9.0\)"):
        TensorRTBackend(out, device="cuda", trt=fake_trt, gpu=GPU_A)
    with pytest.raises(ValueError, match="CUDA devices only"):
        TensorRTBackend(out, device="cpu", trt=fake_trt, gpu=GPU_A)
    _build(export_dir, out, fake_trt, [], gpu=GPU_A, stages=["movq_encoder"])
    assert len(EngineManifest.read(out).stages["movq_encoder"]) == 2
    # one timing cache per TensorRT version and GPU: B's was not overwritten by A's build
    assert (out / TIMING).is_file() and (out / "timing-10.13.0.35-Fake-GPU-B.cache").is_file()


def test_parser_errors_name_the_nodes(export_dir, tmp_path, fake_trt):
    fake_trt.fail_parse = [(12, "/down.0/attn/Softmax", "Softmax", "unsupported axis"), (-1, "", "", "bad graph")]
    with pytest.raises(OnnxParseError) as info:
        _build(export_dir, tmp_path / "e", fake_trt, [], stages=["unet_t2v_video"])
    text = str(info.value)
    assert "unet_t2v_video.onnx" in text and "node 12 '/down.0/attn/Softmax' (Softmax): unsupported axis" in text
    assert "the graph: bad graph" in text


def test_build_failure_reports_tensorrt_errors(export_dir, tmp_path, fake_trt):
    fake_trt.fail_build = True
    with pytest.raises(EngineBuildError, match="could not build stage 'movq_encoder'.*out of fake memory"):
        _build(export_dir, tmp_path / "e", fake_trt, [], stages=["movq_encoder"])


def test_network_io_must_match_the_stage_table(export_dir, tmp_path, fake_trt, monkeypatch):
    spec = FULL["movq_decoder"]  # build movq_encoder's graph against another stage's contract
    with pytest.raises(OnnxParseError, match="the network's inputs are \\['image'\\], stage 'movq_decoder' needs"):
        builder_mod.build_plan(fake_trt, export_dir / "movq_encoder.onnx", spec, spec.profiles, BuildOptions())


def test_build_input_errors(export_dir, tmp_path, fake_trt):
    with pytest.raises(ExportManifestError, match="were not exported"):
        _build(export_dir, tmp_path / "e", fake_trt, [], stages=["nope"])
    with pytest.raises(ProfileError, match="outside the export's range"):
        _build(export_dir, tmp_path / "e", fake_trt, [], resolutions=[Resolution(512, 512)])
    with pytest.raises(ValueError, match="optimisation level 9"):
        BuildOptions(optimization_level=9)
    with pytest.raises(ValueError, match="workspace 0 bytes"):
        BuildOptions(workspace_bytes=0)


# ------------------------------------------------------------------------------------- no TensorRT here

def _has_real_tensorrt() -> bool:
    try:
        import_tensorrt()
        return True
    except TensorRTUnavailable:
        return False


@pytest.mark.skipif(_has_real_tensorrt(), reason="TensorRT is installed here")
def test_import_tensorrt_names_the_fix():
    with pytest.raises(TensorRTUnavailable, match=r"nvcr\.io/nvidia/tensorrt.*pip install tensorrt"):
        import_tensorrt()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_require_gpu_without_one():
    with pytest.raises(TensorRTUnavailable, match="TensorRT needs an NVIDIA GPU"):
        require_gpu()


@pytest.mark.skipif(_has_real_tensorrt() and torch.cuda.is_available(), reason="TensorRT and a GPU are here")
def test_kvt_build_fails_fast_without_tensorrt(export_dir, tmp_path, capsys):
    import time

    start = time.perf_counter()
    assert main(["build", "--onnx", str(export_dir), "--out", str(tmp_path / "e"),
                 "--resolution", "64x64", "--fps", "low"]) == EXIT_FAILURE
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert "cannot build here" in err and "nvcr.io/nvidia/tensorrt" in err and "pip install tensorrt" in err
    assert not (tmp_path / "e").exists()  # nothing written before TensorRT is found


def test_kvt_build_rejects_bad_flags(tmp_path, capsys):
    for flags, message in ((["--resolution", "500x500"], "width 500"), (["--fps", "fast"], "fps mode 'fast'"),
                           (["--workspace", "much"], "size 'much'"), (["--opt-level", "8"], "level 8")):
        assert main(["build", "--onnx", str(tmp_path), "--out", str(tmp_path / "e"), *flags]) == EXIT_INVALID
        assert message in capsys.readouterr().err
    assert main(["build", "--onnx", str(tmp_path / "missing"), "--out", str(tmp_path / "e")]) == EXIT_INVALID
    assert "does not exist" in capsys.readouterr().err


def test_kvt_doctor(capsys):
    assert main(["doctor"]) == EXIT_OK
    text = capsys.readouterr().out
    for word in ("gpu", "nvidia driver", "tensorrt", "onnxruntime", "tritonserver", "backends:", "torch"):
        assert word in text
    main(["doctor", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert set(data["backends"]) == {"torch", "onnxruntime", "tensorrt", "triton"}
    if not _has_real_tensorrt():
        assert data["backends"]["tensorrt"].startswith("unavailable: needs TensorRT")


# ------------------------------------------------------------------------------------- the runner

def _runner(stage, fake_trt, export_dir, monkeypatch, spec_for_load=None, **kwargs):
    """An Engine over a plan the fake built from the real tiny ONNX graph; CPU tensors, fake library."""
    from kvt.runtime.backends.tensorrt.runner import Engine

    spec = TINY[stage]
    built = builder_mod.build_plan(fake_trt, export_dir / f"{stage}.onnx", spec, spec.profiles, BuildOptions())
    load_spec = spec_for_load or spec

    def output_shape(name, shapes):
        metas = {t.name: torch.empty(shapes[t.name], dtype=t.dtype.torch, device="meta") for t in load_spec.inputs}
        return load_spec.shapes(load_spec.bind_dims(metas))[name]

    monkeypatch.setattr(FakeTensorRT, "output_shape", staticmethod(output_shape))
    return Engine(built.plan, load_spec, "cpu", trt=fake_trt, **kwargs)


def test_engine_binds_by_name_reuses_outputs_and_picks_the_profile(export_dir, fake_trt, monkeypatch):
    engine = _runner("unet_interp", fake_trt, export_dir, monkeypatch)
    assert len(engine.profile_ranges) == 2 and engine.arena.nbytes == 0  # sized by the first call's shapes
    spec = TINY["unet_interp"]
    small = spec.sample_inputs({"N": 22, "h": 8, "w": 8})
    out = engine(small)["v"]
    assert out.shape == (22, 12, 8, 8)
    assert engine(small)["v"].data_ptr() == out.data_ptr()  # reused per shape
    large = spec.sample_inputs({"N": 88, "h": 8, "w": 8})
    assert engine(large)["v"].shape == (88, 12, 8, 8)
    first, second = engine.engine.contexts
    assert first.strategy == FakeTensorRT.ExecutionContextAllocationStrategy.USER_MANAGED
    assert ("profile", 0) in first.calls and ("profile", 1) in second.calls
    assert second.shapes["sample"] == (88, 20, 8, 8)
    addresses = {c[1]: c[2] for c in second.calls if c[0] == "address"}
    assert set(addresses) == set(spec.input_names) | {"v"}
    assert ("memory", engine.arena.pointer(), engine.arena.nbytes) in second.calls
    assert sum(c[0] == "execute" for c in first.calls) == 2
    assert sum(c[0] == "shape" and c[1] == "sample" for c in first.calls) == 1  # shapes set once, not per call
    with pytest.raises(Exception, match="outside every optimisation profile|outside the supported range"):
        engine(spec.sample_inputs({"N": 100, "h": 8, "w": 8}))


def test_engine_fresh_outputs_when_not_reused(export_dir, fake_trt, monkeypatch):
    engine = _runner("movq_encoder", fake_trt, export_dir, monkeypatch, reuse_outputs=False)
    inputs = TINY["movq_encoder"].sample_inputs({"B": 1, "h": 8, "w": 8})
    assert engine(inputs)["latent"].data_ptr() != engine(inputs)["latent"].data_ptr()


def test_engine_load_errors(export_dir, fake_trt, monkeypatch):
    from kvt.runtime.backends.tensorrt.runner import Engine, EngineError

    with pytest.raises(EngineError, match="could not deserialize the plan.*magic tag mismatch"):
        Engine(b"not a plan", TINY["movq_encoder"], "cpu", trt=fake_trt)
    with pytest.raises(EngineError, match="not stage 'movq_decoder'"):
        _runner("movq_encoder", fake_trt, export_dir, monkeypatch, spec_for_load=TINY["movq_decoder"])
    engine = _runner("movq_encoder", fake_trt, export_dir, monkeypatch)
    monkeypatch.setattr(FakeTensorRT, "output_shape", staticmethod(lambda name, shapes: (1, 2, 3)))
    with pytest.raises(EngineError, match="TensorRT computes output 'latent' as \\(1, 2, 3\\)"):
        engine(TINY["movq_encoder"].sample_inputs({"B": 1, "h": 8, "w": 8}))


class FakeGraphs:
    """Stands in for torch's CUDA graphs on the CPU: ``capture`` runs the enqueue with the fake library in
    capture mode (where it may refuse, as TensorRT does); ``replay`` runs it again, unless ``empty``
    (an empty graph, which replays nothing)."""

    def __init__(self, empty: bool = False) -> None:
        self.empty, self.captures, self.replays = empty, 0, 0

    def capture(self, enqueue, stream):
        self.captures += 1
        FakeTensorRT.capturing = True
        try:
            ok = enqueue(0)
        finally:
            FakeTensorRT.capturing = False
        return ("graph", enqueue) if ok else None

    def replay(self, graph, stream):
        self.replays += 1
        if not self.empty:
            graph[1](0)


MOVQ_INPUT = {"B": 1, "h": 8, "w": 8}


def _graph_engine(fake_trt, export_dir, monkeypatch, graphs, **kwargs):
    return _runner("movq_encoder", fake_trt, export_dir, monkeypatch, cuda_graphs=True, graph_capture=graphs, **kwargs)


def _expected(inputs):
    return 1.0 + float(inputs["image"].double().sum())  # what the fake computes


def test_graph_capture_warms_up_on_the_captured_buffers_and_replays(export_dir, fake_trt, monkeypatch):
    graphs = FakeGraphs()
    engine = _graph_engine(fake_trt, export_dir, monkeypatch, graphs)
    spec = TINY["movq_encoder"]
    for seed in range(4):  # call 1 plain, call 2 warm-up + capture + checked replay, calls 3-4 replay
        inputs = spec.sample_inputs(MOVQ_INPUT, seed=seed)
        out = engine(inputs)["latent"]
        assert torch.allclose(out, torch.full_like(out, _expected(inputs)), rtol=1e-5), seed
    binding = next(iter(engine._bindings.values()))
    assert binding.graph is not None and not binding.graph_failed
    assert graphs.captures == 1 and graphs.replays == 3
    context = engine.engine.contexts[0]
    # the warm-up before the capture ran on the static input buffers the graph uses
    static = binding.static_inputs["image"].data_ptr()
    calls = context.calls
    capture_at = calls.index(("capture", 0))
    warm_up = max(i for i, c in enumerate(calls[:capture_at]) if c[0] == "execute")
    addresses = [c for c in calls[:warm_up] if c[0] == "address" and c[1] == "image"]
    assert addresses[-1][2] == static


def test_a_refused_capture_never_becomes_a_stored_graph(export_dir, fake_trt, monkeypatch, caplog):
    fake_trt.refuse_capture = True  # TensorRT returns False from enqueueV3 while capturing
    graphs = FakeGraphs()
    engine = _graph_engine(fake_trt, export_dir, monkeypatch, graphs)
    spec = TINY["movq_encoder"]
    results = []
    for seed in range(4):
        inputs = spec.sample_inputs(MOVQ_INPUT, seed=seed)
        out = engine(inputs)["latent"]
        results.append(out.clone())
        assert torch.allclose(out, torch.full_like(out, _expected(inputs)), rtol=1e-5), seed
    binding = next(iter(engine._bindings.values()))
    assert binding.graph is None and binding.graph_failed
    assert graphs.captures == 1 and graphs.replays == 0  # tried once, then uncaptured for good
    assert "execute_async_v3 returned False during capture" in caplog.text
    assert not torch.equal(results[2], results[3])  # fresh results every step, not a stale replay


def test_an_empty_graph_is_caught_by_the_first_replay(export_dir, fake_trt, monkeypatch, caplog):
    graphs = FakeGraphs(empty=True)  # capture "succeeds" but replays nothing
    engine = _graph_engine(fake_trt, export_dir, monkeypatch, graphs)
    spec = TINY["movq_encoder"]
    for seed in range(3):
        inputs = spec.sample_inputs(MOVQ_INPUT, seed=seed)
        out = engine(inputs)["latent"]
        assert torch.isfinite(out).all() and torch.allclose(out, torch.full_like(out, _expected(inputs)), rtol=1e-5)
    binding = next(iter(engine._bindings.values()))
    assert binding.graph is None and binding.graph_failed and graphs.replays == 1
    assert "first replay of the graph" in caplog.text


def test_torch_graph_capture_is_thread_local_and_drops_a_refused_enqueue(monkeypatch):
    """torch.cuda.graph needs a GPU; its arguments and the handling of enqueue's result are checked
    with recording stand-ins (the real capture runs in tests/test_tensorrt_engines.py)."""
    from kvt.runtime.backends.tensorrt import runner

    seen = {}

    class Stream:
        cuda_stream = 7

        def wait_stream(self, other):
            seen.setdefault("waits", 0)
            seen["waits"] += 1

    @contextlib.contextmanager
    def graph(g, stream=None, capture_error_mode="global"):
        seen["mode"], seen["stream"] = capture_error_mode, stream
        yield

    monkeypatch.setattr(runner.torch.cuda, "CUDAGraph", lambda: "graph")
    monkeypatch.setattr(runner.torch.cuda, "Stream", lambda device: Stream())
    monkeypatch.setattr(runner.torch.cuda, "graph", graph)
    capture = runner.TorchGraphCapture(torch.device("cuda"))
    assert capture.capture(lambda handle: handle == 7, Stream()) == "graph"
    assert seen["mode"] == "thread_local" and seen["waits"] == 2
    assert capture.capture(lambda handle: False, Stream()) is None


def test_activation_memory_follows_the_shapes_in_use(export_dir, fake_trt, monkeypatch):
    engine = _runner("unet_interp", fake_trt, export_dir, monkeypatch)
    spec = TINY["unet_interp"]
    engine(spec.sample_inputs({"N": 22, "h": 8, "w": 8}))
    small, generation = engine.arena.nbytes, engine.arena.generation
    context = engine.engine.contexts[0]
    assert small == context.update_device_memory_size_for_shapes() < engine.max_activation_bytes * 1000
    engine(spec.sample_inputs({"N": 88, "h": 8, "w": 8}))
    assert engine.arena.nbytes > small and engine.arena.generation == generation + 1  # grown on demand
    large = engine.arena.nbytes
    engine(spec.sample_inputs({"N": 22, "h": 8, "w": 8}))
    assert engine.arena.nbytes == large  # never shrunk


def test_graph_outputs_of_non_loop_stages_are_fresh_tensors(export_dir, fake_trt, monkeypatch):
    engine = _graph_engine(fake_trt, export_dir, monkeypatch, FakeGraphs(), reuse_outputs=False)
    spec = TINY["movq_encoder"]
    outs = [engine(spec.sample_inputs(MOVQ_INPUT, seed=seed))["latent"] for seed in range(4)]
    assert len({o.data_ptr() for o in outs}) == 4  # replays of static buffers, handed out as copies
    assert not torch.equal(outs[2], outs[3])


def test_misaligned_inputs_are_copied_to_aligned_buffers(export_dir, fake_trt, monkeypatch):
    from kvt.runtime.backends.tensorrt.runner import IO_ALIGNMENT, aligned

    engine = _runner("movq_encoder", fake_trt, export_dir, monkeypatch)
    image = TINY["movq_encoder"].sample_inputs(MOVQ_INPUT)["image"]
    backing = torch.zeros(image.numel() + 64)
    view = backing[1:1 + image.numel()].view(image.shape)  # 4 bytes past an allocation: misaligned
    view.copy_(image)
    assert view.data_ptr() % IO_ALIGNMENT
    out = engine({"image": view})["latent"]
    bound = [c[2] for c in engine.engine.contexts[0].calls if c[0] == "address" and c[1] == "image"]
    assert bound and all(address % IO_ALIGNMENT == 0 for address in bound)
    assert torch.allclose(out, torch.full_like(out, _expected({"image": image})), rtol=1e-5)
    copy = aligned(view)
    assert copy.data_ptr() % IO_ALIGNMENT == 0 and torch.equal(copy, view)
    already = aligned(copy)
    assert already.data_ptr() == copy.data_ptr()  # aligned tensors are used in place


def test_a_profile_tensorrt_refuses_is_an_engine_error(export_dir, fake_trt, monkeypatch):
    from kvt.runtime.backends.tensorrt.runner import EngineError

    engine = _runner("unet_interp", fake_trt, export_dir, monkeypatch)
    with pytest.raises(EngineError, match="refused optimisation profile 5"):
        engine._context(5, 0, ())


def test_old_tensorrt_is_refused_with_the_minimum(export_dir, fake_trt, monkeypatch):
    from kvt.runtime.backends.tensorrt.runner import Engine
    from kvt.runtime.backends.tensorrt.trt_env import MIN_TENSORRT_VERSION, check_tensorrt_version, version_tuple

    assert MIN_TENSORRT_VERSION == "10.12" and version_tuple("10.13.0.35") == (10, 13, 0, 35)
    assert version_tuple("10.14.1.post2") == (10, 14, 1)
    for ok in ("10.12.0.36", "10.13.3.9", "11.1.0.11"):
        monkeypatch.setattr(FakeTensorRT, "__version__", ok)
        check_tensorrt_version(FakeTensorRT)
    for old in ("10.0.1.6", "10.11.0.33", "9.3.0"):
        monkeypatch.setattr(FakeTensorRT, "__version__", old)
        with pytest.raises(TensorRTUnavailable, match=f"TensorRT {old} is older than 10.12"):
            check_tensorrt_version(FakeTensorRT)
    with pytest.raises(TensorRTUnavailable, match="older than 10.12"):
        Engine(b"{}", TINY["movq_encoder"], "cpu", trt=fake_trt)
    with pytest.raises(TensorRTUnavailable, match="older than 10.12"):
        _build(export_dir, Path("/nonexistent/never-written"), fake_trt, [], stages=["movq_encoder"])


def test_a_rejected_timing_cache_starts_empty_and_its_errors_are_not_the_builds(export_dir, tmp_path, fake_trt,
                                                                              caplog):
    out = tmp_path / "engines"
    _build(export_dir, out, fake_trt, [], stages=["movq_encoder"])
    assert (out / TIMING).read_bytes() == b"+"
    fake_trt.reject_timing_cache = True  # create_timing_cache(blob) -> None, as for a foreign cache
    _build(export_dir, out, fake_trt, [], stages=["movq_encoder"], options=BuildOptions(force=True))
    assert fake_trt.last_timing_cache == b""  # fell back to an empty cache instead of a pybind error
    assert "does not fit this TensorRT/GPU" in caplog.text


def test_same_compute_capability_plans(export_dir, tmp_path, fake_trt):
    out = tmp_path / "engines"
    _build(export_dir, out, fake_trt, [], stages=["movq_encoder"],
           options=BuildOptions(same_compute_capability=True))
    entry = EngineManifest.read(out).stages["movq_encoder"][0]
    assert (entry.key.device, entry.key.sm_count) == (ANY_DEVICE, 0)
    assert json.loads((out / entry.plan).read_bytes())["hardware"] == "SAME_COMPUTE_CAPABILITY"
    other = PlanTarget("10.13.0.35", "9.0", "Another 9.0 GPU", 78)
    assert EngineCache(out).select("movq_encoder", other) == entry


def test_fp32_text_encoder_on_request_and_bf16_needs_ampere(export_dir, tmp_path, fake_trt):
    out = tmp_path / "engines"
    _build(export_dir, out, fake_trt, [], stages=["text_encoder"], options=BuildOptions(text_encoder_precision="fp32"))
    assert EngineManifest.read(out).stages["text_encoder"][0].key.precision == "fp32"
    turing = GpuInfo(0, "Fake T4", "7.5", 16 * 2**30, 40)
    with pytest.raises(UserError, match="BF16 plans need compute capability 8.0.*--text-encoder-precision fp32"):
        _build(export_dir, tmp_path / "t4", fake_trt, [], stages=["text_encoder"], gpu=turing)
    with pytest.raises(UserError, match="text encoder precision 'fp8'"):
        BuildOptions(text_encoder_precision="fp8")


def test_a_set_that_cannot_fit_the_gpu_is_refused_before_building(export_dir, tmp_path, fake_trt):
    from kvt.engines.memory_plan import MemoryPlanError

    tiny_gpu = GpuInfo(0, "Fake 1 GiB GPU", "9.0", 2**30, 16)
    with pytest.raises(MemoryPlanError, match="does not fit Fake 1 GiB GPU"):
        _build(export_dir, tmp_path / "e", fake_trt, [], gpu=tiny_gpu)
    assert fake_trt.builds == 0 and not (tmp_path / "e").exists()
    result = _build(export_dir, tmp_path / "e", fake_trt, [], gpu=tiny_gpu, stages=["movq_encoder"],
                    options=BuildOptions(memory_check=False))
    assert fake_trt.builds == 1 and not result.memory.fits("tensorrt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_pipeline_from_engines_checks_assets_then_the_gpu(export_dir, tmp_path, fake_trt):
    from kvt.runtime.pipeline import KandinskyVideoPipeline

    out = tmp_path / "engines"
    _build(export_dir, out, fake_trt, [], stages=["movq_encoder"])
    with pytest.raises(TensorRTUnavailable, match="TensorRT needs an NVIDIA GPU"):
        KandinskyVideoPipeline.from_engines(out)  # assets found beside the plans, then no GPU
    import shutil

    shutil.rmtree(out / "tokenizer")
    with pytest.raises(TensorRTUnavailable):
        KandinskyVideoPipeline.from_engines(out)  # tokenizer from the export directory instead
    data = json.loads((out / "manifest.json").read_text())
    data["onnx_dir"] = str(tmp_path / "gone")
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineManifestError, match="asset 'tokenizer' is neither in the engine directory"):
        KandinskyVideoPipeline.from_engines(out)


# ------------------------------------------------------------------------------------- remaining branches

def test_nearest_profile_skips_profiles_that_do_not_contain_the_call():
    from kvt.contract.profiles import _nearest_profile

    spec = dataclasses.replace(FULL["unet_interp"], extra_profiles=(
        {"N": Dim(90, 100, 100, 2), "h": Dim(32, 64, 128, 8), "w": Dim(32, 64, 128, 8)},))
    assert _nearest_profile(spec, {"N": 96, "h": 64, "w": 64}) == 1
    assert _nearest_profile(spec, {"N": 22, "h": 64, "w": 64}) == 0
    with pytest.raises(ProfileError, match="outside every profile of the stage table"):
        _nearest_profile(spec, {"N": 2, "h": 64, "w": 64})


def test_opt_value_falls_back_to_all_calls_and_breaks_ties_upward():
    from collections import Counter

    from kvt.contract.profiles import _opt_value

    assert _opt_value(Counter({4: 3, 5: 9}), Counter()) == 5
    assert _opt_value(Counter({4: 3, 5: 9}), Counter({4: 1})) == 4
    assert _opt_value(Counter({2: 1, 5: 1}), Counter()) == 5


def test_input_shapes_leave_static_inputs_out():
    from kvt.contract.dtypes import DType
    from kvt.contract.stages import StageSpec, TensorSpec

    spec = StageSpec("s", "n", inputs=(TensorSpec("a", DType.FP32, ("B", 3)), TensorSpec("fixed", DType.FP32, (2, 3))),
                     outputs=(), dims={"B": Dim(1, 2, 4)})
    assert input_shapes(spec, spec.dims) == {"a": ((1, 3), (2, 3), (4, 3))}


def test_lookup_in_an_empty_directory_and_failed_atomic_writes(tmp_path, monkeypatch):
    from kvt.formats import engine_cache as cache_mod

    assert EngineCache(tmp_path / "nothing").lookup(_key()) is None

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(cache_mod.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        cache_mod.write_atomic(tmp_path / "x.plan", b"data")
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one
