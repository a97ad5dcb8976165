"""The production repository (``kvt triton-repo --backend tensorrt``) as users deploy it, checked field by
field against what Triton and its TensorRT backend do with it (../shared/reviews/triton.md, findings 1-12).

The plans are stand-ins with exactly the profiles ``kvt build`` records for the same flags (the builder's
own profile code, build keys and manifest); tests/test_rehearse.py serves such repositories for real.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvt.contract.profiles import Resolution, parse_resolution, select_profiles
from kvt.contract.stages import FPS_FRAMES
from kvt.engines.builder import BuildOptions, build_engines
from kvt.formats.export_dir import ExportManifest
from kvt.formats.triton_repo import (
    MODEL_RECORD,
    ORCHESTRATOR_MODEL,
    PIPELINE_FILE,
    STREAM_MODEL,
    TENSORRT,
    TEXT_ENCODING_MODEL,
    TOKENIZER_MODEL,
    RepositoryError,
    verify_model_record,
)
from kvt.rehearsal.standin import STANDIN_VERSION, StandinPlanMaker
from kvt.serving.generator.configs import RepositoryOptions
from kvt.serving.generator.repository import build_repository

pb = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")


def _engines(export: Path, out: Path, resolutions: list[str], fps: list[str], batch_range: str = "requests") -> Path:
    build_engines(export, out, [parse_resolution(r) for r in resolutions], fps, None, BuildOptions(), lambda m: None,
                  table_batch=batch_range == "table", maker=StandinPlanMaker())
    return out


def _repo(tmp_path: Path, export: Path, resolutions: list[str], fps: list[str], batch_range: str = "requests",
          **options) -> Path:
    engines = _engines(export, tmp_path / "engines", resolutions, fps, batch_range)
    return build_repository(tmp_path / "repo", None, engines, RepositoryOptions(backend=TENSORRT, **options),
                            tensorrt_version=STANDIN_VERSION)


def _config(repo: Path, model: str):
    return text_format.Parse((repo / model / "config.pbtxt").read_text(), pb.ModelConfig())


def test_build_without_fps_covers_every_mode(tiny_export_fp16):
    """Finding 2: `kvt build --resolution` built fps low only although its help says 'default: all'."""
    table = ExportManifest.read(tiny_export_fp16).stage_table()
    profiles = select_profiles(table, [Resolution(64, 64)], ())
    assert "unet_interp" in profiles, "no --fps must build the interpolation U-Net (fps medium and high)"
    rows = sorted(p["N"].max for p in profiles["unet_interp"])
    assert rows == [22, 88]  # the 12->45 and 45->177 passes
    (decoder,) = profiles["video_movq_decoder"]
    assert decoder["F"].min <= 2 and decoder["F"].max >= 5  # fps low chunks of 4, medium 5, high 5 and a 2


def test_text_ensemble_takes_the_text_encoders_batch_limit(tmp_path, tiny_export_fp16):
    """Finding 1: the ensemble kept the table's max_batch_size (4) while the plan capped text_encoder at 1:
    Triton refuses such an ensemble and the server exits."""
    repo = _repo(tmp_path, tiny_export_fp16, ["64x64"], [])
    encoder = _config(repo, "text_encoder")
    assert encoder.max_batch_size == 1  # a `--batch-range requests` plan takes one request's row
    for model in (TEXT_ENCODING_MODEL, TOKENIZER_MODEL):
        assert _config(repo, model).max_batch_size == encoder.max_batch_size, model


def test_instance_groups_list_every_profile_of_the_plan(tmp_path, tiny_export_fp16):
    """Finding 3: without `profile`, Triton's TensorRT backend uses profile 0 only (88-row pass fails)."""
    repo = _repo(tmp_path, tiny_export_fp16, ["64x64"], ["medium", "high"])
    interp = _config(repo, "unet_interp")
    assert [list(g.profile) for g in interp.instance_group] == [["0", "1"]]
    assert [list(g.profile) for g in _config(repo, "unet_t2v_video").instance_group] == [["0"]]


def test_warmup_per_plan_profile_with_batch_size_one(tmp_path, tiny_export_fp16):
    """Finding 4: batch_size 0 samples are skipped by Triton core, and table-opt shapes a plan lacks fail
    the load. Each profile gets a sample at its own opt; non-batching models use batch_size 1."""
    repo = _repo(tmp_path, tiny_export_fp16, ["128x64"], ["medium", "high"])
    for stage in ("unet_t2v_video", "unet_interp", "video_movq_decoder", "movq_decoder"):
        config = _config(repo, stage)
        assert config.max_batch_size == 0
        assert config.model_warmup, stage
        assert all(w.batch_size == 1 for w in config.model_warmup), stage
    interp = _config(repo, "unet_interp")
    assert [w.name for w in interp.model_warmup] == ["unet_interp_profile0", "unet_interp_profile1"]
    rows = sorted(int(w.inputs["sample"].dims[0]) for w in interp.model_warmup)
    assert rows == [22, 88]
    # 128x64 frames: latent 16 wide, 8 high; the table's opt (64x64) is not in these plans
    sample = _config(repo, "unet_t2v_video").model_warmup[0].inputs["sample"]
    assert list(sample.dims)[-2:] == [8, 16]
    encoder = _config(repo, "movq_encoder")
    assert encoder.max_batch_size == 1 and encoder.model_warmup[0].batch_size == 1
    assert list(encoder.model_warmup[0].inputs["image"].dims) == [3, 64, 128]


def test_served_profiles_recorded_for_the_orchestrator(tmp_path, tiny_export_fp16):
    """Finding 5: the orchestrator validated against the export only; the plans' profiles are recorded
    and the config tells clients what is served."""
    repo = _repo(tmp_path, tiny_export_fp16, ["64x64"], ["low"])
    meta = json.loads((repo / ORCHESTRATOR_MODEL / "1" / PIPELINE_FILE).read_text())
    assert "unet_interp" not in meta["served_profiles"] or not meta["served_profiles"]["unet_interp"]
    video = meta["served_profiles"]["unet_t2v_video"]
    assert [[p["h"][:3] for p in plan] for plan in video] == [[[8, 8, 8]]]
    params = _config(repo, ORCHESTRATOR_MODEL).parameters
    assert params["fps_modes"].string_value == "low"
    assert params["default_width"].string_value == "64" and params["resolution"].string_value == "64,64"


def test_each_model_verifies_only_what_it_owns(tmp_path, tiny_export_fp16):
    """Finding 6: the orchestrator checked the whole repository from its parent folder, so cloud-storage
    repositories, a second --model-repository, a swapped plan or a deleted unused model stopped it."""
    repo = _repo(tmp_path, tiny_export_fp16, ["64x64"], [])
    orchestrator = repo / ORCHESTRATOR_MODEL / "1"
    verify_model_record(orchestrator)
    # another model's plan rebuilt (different bytes) and the unused stream model removed: still fine
    plan = repo / "unet_t2v_video" / "1" / "model.plan"
    plan.write_bytes(plan.read_bytes() + b" ")
    import shutil

    shutil.rmtree(repo / STREAM_MODEL)
    moved = tmp_path / "elsewhere" / ORCHESTRATOR_MODEL
    shutil.copytree(repo / ORCHESTRATOR_MODEL, moved)  # localised alone, as from cloud storage
    verify_model_record(moved / "1")
    # its own files are still checked, naming the file
    nulls = moved / "1" / "null_embeddings.safetensors"
    nulls.write_bytes(nulls.read_bytes()[:-10])
    with pytest.raises(RepositoryError, match="null_embeddings.safetensors.*truncated"):
        verify_model_record(moved / "1")
    assert (moved / "1" / MODEL_RECORD).is_file()


def test_queue_bound_and_timeouts_in_the_orchestrator_config(tmp_path, tiny_export_fp16):
    """Finding 7: an unbounded orchestrator queue; no bound on a stage call; no queue timeout."""
    repo = _repo(tmp_path, tiny_export_fp16, ["64x64"], [], max_queue_size=3, queue_timeout_s=20.0,
                 stage_timeout_s=45.0)
    for model in (ORCHESTRATOR_MODEL, STREAM_MODEL):
        config = _config(repo, model)
        policy = config.dynamic_batching.default_queue_policy
        assert policy.max_queue_size == 3 and policy.default_timeout_microseconds == 20_000_000
        assert policy.timeout_action == pb.ModelQueuePolicy.REJECT
        assert config.parameters["stage_timeout_s"].string_value == "45.0"
        assert not [i for i in config.input if i.name == "PROMPT" and i.optional]  # PROMPT is required


def test_one_request_stays_on_one_gpu_by_default(tmp_path, tiny_export_fp16):
    """Finding 9: with no --gpus every model loaded on every GPU and one request's calls could hop."""
    repo = _repo(tmp_path, tiny_export_fp16, ["64x64"], [])
    for model in (*ExportManifest.read(tiny_export_fp16).stage_table().names, ORCHESTRATOR_MODEL, STREAM_MODEL):
        groups = _config(repo, model).instance_group
        assert [list(g.gpus) for g in groups] == [[0]], model
    assert _config(repo, "unet_t2v_video").parameters["execution_context_allocation_strategy"].string_value == "STATIC"


def test_every_fps_mode_has_a_plan_with_default_flags(tmp_path, tiny_export_fp16):
    repo = _repo(tmp_path, tiny_export_fp16, ["64x64"], [])
    params = _config(repo, ORCHESTRATOR_MODEL).parameters
    assert params["fps_modes"].string_value.split(",") == list(FPS_FRAMES)
