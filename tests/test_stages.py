"""The stage contract table: internal consistency, validation errors, and the per-request plan."""

import itertools

import pytest
import torch

from kvt.contract.plan import check_plan_consistency, request_plan, video_decode_chunks
from kvt.contract.stages import FPS_FRAMES, ModelDims, ResolutionRange, StageInputError, build_stage_table, parse_symbol
from kvt.models import FULL, TINY
from kvt.models.stage_modules import stage_table_for

STAGES = ("text_encoder", "unet_t2v_image", "unet_t2v_video", "unet_interp", "movq_encoder",
          "movq_decoder", "video_movq_decoder")


@pytest.fixture(params=[FULL, TINY], ids=lambda p: p.name)
def table(request):
    return build_stage_table(ModelDims.from_config(request.param.config))


def test_every_stage_present(table):
    assert table.names == STAGES


def test_symbols_are_declared_and_outputs_derivable(table):
    for stage in table:
        input_symbols = {parse_symbol(e)[1] for t in stage.inputs for e in t.shape if isinstance(e, str)}
        output_symbols = {parse_symbol(e)[1] for t in stage.outputs for e in t.shape if isinstance(e, str)}
        assert input_symbols == set(stage.dims), stage.name
        assert output_symbols <= input_symbols, f"{stage.name}: output dims must be bound by inputs"
        for profile in stage.profiles:
            assert set(profile) == set(stage.dims)


def test_sample_inputs_bind_at_min_opt_max(table):
    for stage in table:
        for profile in stage.profiles:
            for corner in ("min", "opt", "max"):
                dims = {k: getattr(d, corner) for k, d in profile.items()}
                inputs = stage.sample_inputs(dims)
                assert stage.bind_dims(inputs) == dims


def test_context_length_follows_config():
    full = build_stage_table(ModelDims.from_config(FULL.config))
    tiny = build_stage_table(ModelDims.from_config(TINY.config))
    # The distinct contexts [prompt, null], once per call whatever the rows.
    assert full["unet_t2v_video"].shapes(full["unet_t2v_video"].opt_dims())["context"] == (2, 128, 4096)
    assert tiny["unet_t2v_video"].shapes(tiny["unet_t2v_video"].opt_dims())["context"] == (2, 16, 32)
    assert full["movq_decoder"].shapes({"h": 128, "w": 128})["image"] == (1, 3, 1024, 1024)


def test_interpolation_has_two_profiles(table):
    profiles = table["unet_interp"].profiles
    assert [p["N"].opt for p in profiles] == [22, 88]


@pytest.mark.parametrize("mutate,message", [
    (lambda x: x.pop("timestep"), "missing \\['timestep'\\]"),
    (lambda x: x.__setitem__("extra", torch.zeros(1)), "unexpected \\['extra'\\]"),
    (lambda x: x.__setitem__("timestep", x["timestep"].double()), "dtype torch.float64"),
    (lambda x: x.__setitem__("sample", x["sample"][:, :8]), "axis 1 is 8, must be 9"),
    (lambda x: x.__setitem__("timestep", torch.zeros(35)), "dim N is 36 in one input and 35"),
    (lambda x: x.__setitem__("sample", torch.zeros(36, 9, 8, 12)), "dim w=12 is outside"),
])
def test_bind_dims_errors_name_the_problem(mutate, message):
    stage = build_stage_table(ModelDims.from_config(TINY.config))["unet_t2v_video"]
    inputs = stage.sample_inputs({"N": 36, "h": 8, "w": 8})
    mutate(inputs)
    with pytest.raises(StageInputError, match=message):
        stage.bind_dims(inputs)


def test_video_batch_must_be_whole_frame_groups():
    stage = build_stage_table(ModelDims.from_config(TINY.config))["unet_t2v_video"]
    with pytest.raises(StageInputError, match="N=30 is outside"):
        stage.bind_dims(stage.sample_inputs({"N": 30, "h": 8, "w": 8}))


@pytest.mark.parametrize("frames", range(4, 200))
def test_video_decode_chunks_are_torch_chunk(frames):
    expected = [c.shape[0] for c in torch.zeros(frames).chunk(frames // 4)]
    assert video_decode_chunks(frames) == expected


def test_plan_matches_the_spec_call_counts():
    """Spec README, 'Network calls per video'."""
    counts = {}
    for fps in FPS_FRAMES:
        plan = request_plan(512, 512, fps, with_image=False)
        counts[fps] = {(c.stage, tuple(sorted(c.dims.items()))): c.calls for c in plan}
    decoder = lambda plan_counts: sorted(  # noqa: E731
        (dict(k[1])["F"], n) for k, n in plan_counts.items() if k[0] == "video_movq_decoder")
    assert decoder(counts["low"]) == [(4, 3)]
    assert decoder(counts["medium"]) == [(5, 9)]
    assert decoder(counts["high"]) == [(2, 1), (5, 35)]
    interp = [(dict(k[1])["N"], n) for k, n in counts["high"].items() if k[0] == "unet_interp"]
    assert sorted(interp) == [(22, 10), (88, 10)]
    with_image = {c.stage for c in request_plan(512, 512, "low", with_image=True)}
    assert "unet_t2v_image" not in with_image and "movq_decoder" not in with_image


@pytest.mark.parametrize("preset", [FULL, TINY], ids=lambda p: p.name)
def test_every_supported_request_fits_the_table(preset):
    table = stage_table_for(preset.config)
    r = table.resolution
    sizes = sorted({r.min, r.opt, r.max, r.min + 64 if r.min + 64 <= r.max else r.min})
    for width, height, fps in itertools.product(sizes, sizes, FPS_FRAMES):
        for with_image in (False, True):
            check_plan_consistency(table, request_plan(width, height, fps, with_image))


def test_preset_resolution_ranges():
    assert (stage_table_for(FULL.config).resolution.min, stage_table_for(FULL.config).resolution.max) == (256, 1024)
    assert stage_table_for(TINY.config).resolution.max == 256


def test_resolution_range_rejects_non_multiples():
    with pytest.raises(ValueError, match="multiple of 64"):
        ResolutionRange(min=100)
