"""Hostile and random requests at the pipeline API: each is served correctly or rejected cleanly.

A property-based test (hypothesis, fixed seed so CI is reproducible) draws requests from valid values,
wrong types, NaN/inf, huge numbers, empty and mis-typed image arrays and unknown keys. A rejection
must be an InvalidRequestError naming the parameter (or Python's own TypeError naming an unknown
keyword); a served request must return frames of the asked size and count. No case may crash, hang or
leave files behind. The number of cases tried is written to the test log.
"""

from __future__ import annotations

import math
import os
import tempfile
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from kvt.contract.request import MAX_PROMPT_CHARS, GenerationRequest, InvalidRequestError, validate_request
from kvt.contract.stages import FPS_FRAMES
from kvt.runtime.pipeline import GenerationTimeout

CASES = {"tried": 0, "served": 0, "rejected": 0, "timed_out": 0}
FUZZ_CASES = 40  # about 30 CPU-s on the tiny preset
TIME_LIMIT_S = 5.0  # per request; valid-but-expensive draws (e.g. 96 or 1000 steps) are stopped by it


_junk = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                  st.text(max_size=8), st.binary(max_size=8), st.lists(st.integers(), max_size=3),
                  st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


_arrays = st.one_of(
    st.builds(lambda h, w: np.random.default_rng(h * w).integers(0, 255, (h, w, 3), dtype=np.uint8),
              st.integers(64, 80), st.integers(64, 80)),
    st.builds(lambda shape, dtype: np.zeros(shape, dtype=dtype),
              st.sampled_from([(0, 64, 3), (64, 0, 3), (64, 64, 2), (64, 64), (64,), (2, 64, 64, 3), (64, 64, 5)]),
              st.sampled_from([np.uint8, np.float32, np.int64, np.bool_])),
    st.just(np.full((64, 64, 3), np.nan, dtype=np.float32)),
    st.just(torch.zeros(64, 64, 3, dtype=torch.uint8)),
    st.just(Image.new("RGB", (8, 8))),
    st.just("/nonexistent/image.png"),
    st.just(Image.new("RGB", (96, 64), (200, 10, 10))),
)

# A valid request (small steps so that served cases stay cheap) ...
_valid = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=40).filter(lambda t: t.strip() and "\x00" not in t),
     # always given: the official defaults (50 / 50 / 10 steps) would make every served case slow
     "key_frame_steps": st.integers(1, 2), "base_frame_steps": st.integers(1, 2),
     "interpolation_steps": st.integers(1, 2)},
    optional={
        "width": st.just(64), "height": st.just(64),
        # fps high (177 frames, two interpolation passes) costs ~10x low: served elsewhere, not here
        "fps": st.sampled_from(["low"] * 6 + ["medium"]),
        "motion": st.sampled_from(["low", "medium", "high", "extreme"]),
        "key_frame_guidance_scale": st.floats(0, 100), "guidance_weight_prompt": st.floats(0, 100),
        "guidance_weight_image": st.floats(0, 100), "interpolation_guidance_scale": st.floats(0, 100),
        "noise_augmentation": st.integers(0, 999), "seed": st.integers(0, 2**63 - 1),
    },
)
_FIELDS = ["prompt", "width", "height", "fps", "motion", "key_frame_guidance_scale", "guidance_weight_prompt",
           "guidance_weight_image", "interpolation_guidance_scale", "noise_augmentation", "seed",
           "key_frame_steps", "base_frame_steps", "interpolation_steps", "timeout_s", "no_such_option"]
_hostile = st.one_of(
    _junk, st.just(""), st.just("   "), st.just("x" * (MAX_PROMPT_CHARS + 1)), st.just("a\x00b"),
    st.just(float("nan")), st.just(float("inf")), st.just(-float("inf")), st.just(0), st.just(-1),
    st.just(10**9), st.just(2**63), st.just(1000), st.just(1088), st.just(np.int64(64)), st.just(64.0),
    st.just(True), st.just(b"low"), st.just("LOW"),
)


@st.composite
def requests(draw):
    """... then 0-2 fields replaced by hostile values, and sometimes an image (valid or not)."""
    kwargs = draw(_valid)
    for field in draw(st.lists(st.sampled_from(_FIELDS), max_size=2, unique=True)):
        kwargs[field] = draw(_hostile)
    if draw(st.integers(0, 3)) == 0:
        kwargs["image"] = draw(_arrays)
    return kwargs


@pytest.fixture(scope="module", autouse=True)
def _no_leftovers(tmp_path_factory):
    """Every temporary file the pipeline could create goes to a private directory that must stay empty
    (the machine's own /tmp is shared with other processes, so it cannot be the yardstick)."""
    private = tmp_path_factory.mktemp("private_tmp")
    saved = tempfile.tempdir
    tempfile.tempdir = str(private)
    try:
        yield
    finally:
        tempfile.tempdir = saved
    # torch keeps its compiler cache folder (torchinductor_<user>) in the temporary directory by design.
    leaked = [name for name in os.listdir(private) if not name.startswith("torchinductor_")]
    assert not leaked, f"files left behind: {sorted(leaked)[:10]}"


@settings(max_examples=FUZZ_CASES, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure prints its request as drawn
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(kwargs=requests())
def test_random_requests_are_served_or_rejected_cleanly(tiny_pipeline, kwargs):
    CASES["tried"] += 1
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt")
    kwargs.setdefault("timeout_s", TIME_LIMIT_S)
    start = time.monotonic()
    try:
        out = tiny_pipeline(prompt, progress=False, **kwargs)
    except GenerationTimeout as exc:
        CASES["timed_out"] += 1
        assert time.monotonic() - start < float(kwargs["timeout_s"]) + 30, "stopped within a step"
        assert exc.stage in ("key_frame", "base_frames", "interpolation")
        return
    except InvalidRequestError as exc:
        CASES["rejected"] += 1
        assert exc.parameter and str(exc).startswith(exc.parameter), str(exc)
        assert len(str(exc)) < 1000, "error messages stay short even for huge values"
        return
    except TypeError as exc:
        CASES["rejected"] += 1
        assert "no_such_option" in kwargs and "no_such_option" in str(exc), repr(exc)
        return
    CASES["served"] += 1
    assert "no_such_option" not in kwargs
    fps = kwargs.get("fps", "low")
    assert out.frames.dtype == np.uint8
    # None means "the pipeline's default size" (64 for the tiny preset).
    assert out.frames.shape == (FPS_FRAMES[fps], kwargs.get("height") or 64, kwargs.get("width") or 64, 3)
    assert time.monotonic() - start < 120


def test_fuzz_case_count_is_reported(capsys):
    # Runs after the property test (file order): the figure for the README and the issue note.
    with capsys.disabled():
        print(f"\nhostile-request fuzz (pipeline API): {CASES['tried']} cases, {CASES['served']} served, "
              f"{CASES['rejected']} rejected, {CASES['timed_out']} stopped by the {TIME_LIMIT_S:g} s limit")
    assert CASES["tried"] >= FUZZ_CASES and CASES["served"] > 0 and CASES["rejected"] > 0


@pytest.mark.parametrize("field,value,fragment", [
    ("width", 10**12, "width=1000000000000 is not allowed: a multiple of 64"),
    ("height", float("nan"), "height=nan is not allowed"),
    ("fps", ["low"], "fps=\"<list: ['low']>\" is not allowed: one of ['low', 'medium', 'high']"),
    ("motion", {"a": 1}, "motion=\"<dict"),
    ("guidance_weight_prompt", float("inf"), "a finite number in [0, 100]"),
    ("base_frame_steps", 10**9, "an integer in [1, 1000]"),
    ("seed", -1, "seed=-1 is not allowed"),
    ("prompt", "y" * (MAX_PROMPT_CHARS + 1), f"at most {MAX_PROMPT_CHARS} characters"),
])
def test_each_limit_names_the_value_and_the_limit(field, value, fragment):
    base = {"prompt": "a cat", "width": 64, "height": 64}
    base[field] = value
    with pytest.raises(InvalidRequestError) as err:
        validate_request(GenerationRequest(**base), _resolution())
    assert fragment in str(err.value)


def _resolution():
    from kvt.models.presets import TINY
    from kvt.models.stage_modules import stage_table_for

    return stage_table_for(TINY.config).resolution


def test_oversized_image_is_refused_before_decoding(tmp_path, tiny_pipeline):
    path = tmp_path / "huge.png"
    Image.new("L", (9000, 10)).save(path)  # small file, too many pixels per side
    with pytest.raises(InvalidRequestError, match=r"9000x10 pixels: at most 8192 per side"):
        tiny_pipeline("a cat", image=path, progress=False)


def test_image_formats_outside_the_list_are_not_tried(tmp_path, tiny_pipeline):
    path = tmp_path / "picture.ico"
    Image.new("RGB", (64, 64)).save(path)
    with pytest.raises(InvalidRequestError, match="formats"):
        tiny_pipeline("a cat", image=path, progress=False)


def test_timeout_stops_within_one_step(tiny_pipeline):
    seen = []
    start = time.monotonic()
    with pytest.raises(GenerationTimeout, match="time limit of 0.001 s at key_frame step 0") as err:
        tiny_pipeline("a cat", seed=1, progress=False, timeout_s=0.001, callback=lambda info: seen.append(info.step))
    assert err.value.stage == "key_frame" and err.value.step == 0 and not seen
    assert time.monotonic() - start < 30
    out = tiny_pipeline("a cat", seed=1, progress=False, key_frame_steps=1, base_frame_steps=1)
    assert out.frames.shape[0] == 12, "the pipeline serves the next request"
    assert not math.isnan(float(out.latents.abs().sum()))
