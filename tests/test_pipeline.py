"""The pipeline on the tiny preset: every fps mode and image-to-video, the stage plan, seeding,
cancellation, validation before work, and video files."""

from __future__ import annotations

import warnings

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from kvt.contract.plan import request_plan
from kvt.contract.request import InvalidRequestError
from kvt.contract.stages import FPS_FRAMES
from kvt.runtime.pipeline import GenerationCancelled, KandinskyVideoPipeline, StepInfo, interleave
from support.recording import RecordingBackend

FAST = dict(key_frame_steps=3, base_frame_steps=3, interpolation_steps=2, progress=False)


@pytest.fixture()
def recorded(tiny_pipeline):
    backend = RecordingBackend(tiny_pipeline.backend)
    return KandinskyVideoPipeline(backend, tiny_pipeline.tokenizer, tiny_pipeline.t2v_null_embedding,
                                  tiny_pipeline.interpolation_null_embedding, (64, 64)), backend


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (90, 100, 3), dtype=np.uint8))


@pytest.mark.parametrize("fps", list(FPS_FRAMES))
def test_text_to_video_frame_counts_and_plan(recorded, fps):
    pipe, backend = recorded
    out = pipe("a cat on the beach", fps=fps, seed=1, **FAST)
    assert out.frames.shape == (FPS_FRAMES[fps], 64, 64, 3) and out.frames.dtype == np.uint8
    assert out.latents.shape == (FPS_FRAMES[fps], 4, 8, 8)
    assert out.key_frame.size == (128, 128), "the key frame is generated at twice the video size"
    plan = request_plan(64, 64, fps, with_image=False, key_frame_steps=3, base_frame_steps=3,
                        interpolation_steps=2)
    assert backend.counts() == {(c.stage, tuple(sorted(c.dims.items()))): c.calls for c in plan}
    assert [c.stage for c in backend.calls].count("text_encoder") == 1, "prompt encoded once per request"


def test_image_to_video(recorded, photo):
    pipe, backend = recorded
    out = pipe("a small boat", photo, fps="medium", seed=2, **FAST)
    assert out.frames.shape == (45, 64, 64, 3)
    stages = {c.stage for c in backend.calls}
    assert "unet_t2v_image" not in stages and "movq_decoder" not in stages
    assert out.key_frame is photo


def test_interpolated_video_keeps_base_frames_at_every_fourth_index(tiny_pipeline):
    out = tiny_pipeline("a cat", fps="medium", seed=3, **FAST)
    base = tiny_pipeline("a cat", fps="low", seed=3, **FAST)
    assert torch.equal(out.latents[::4], base.latents)


def test_interleave_layout():
    base = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 4, 1, 1)
    new = 10 + torch.arange(2 * 12.0).view(2, 12, 1, 1)
    video = interleave(base, new)
    assert video.shape == (9, 4, 1, 1)
    assert video[::4, 0, 0, 0].tolist() == [0, 1, 2]
    assert video[1:4, 0, 0, 0].tolist() == [10, 14, 18]  # group 0, frames 0..2 (channels frame-major)
    assert video[5:8, 0, 0, 0].tolist() == [22, 26, 30]


def test_seed_reproducible_and_distinct(tiny_pipeline):
    a = tiny_pipeline("a dog running", seed=5, **FAST)
    b = tiny_pipeline("a dog running", seed=5, **FAST)
    c = tiny_pipeline("a dog running", seed=6, **FAST)
    assert np.array_equal(a.frames, b.frames)
    assert not np.array_equal(a.frames, c.frames)
    assert a.seed == 5
    d = tiny_pipeline("a dog running", **FAST)
    assert isinstance(d.seed, int), "an unseeded request reports the seed it drew"


def test_callback_sees_every_step_and_can_cancel(recorded):
    pipe, backend = recorded
    seen: list[StepInfo] = []
    pipe("a cat", fps="medium", seed=1, callback=seen.append, **FAST)
    assert [(s.stage, s.step) for s in seen] == (
        [("key_frame", i) for i in range(3)] + [("base_frames", i) for i in range(3)]
        + [("interpolation", i) for i in range(2)])
    assert seen[-1].num_steps == 2 and seen[-1].latents.shape == (11, 12, 8, 8)

    backend.calls.clear()
    with pytest.raises(GenerationCancelled, match="base_frames step 1"):
        pipe("a cat", seed=1, callback=lambda s: not (s.stage == "base_frames" and s.step == 1), **FAST)
    video_calls = [c for c in backend.calls if c.stage == "unet_t2v_video"]
    assert len(video_calls) == 2, "work stops within one step"
    assert not any(c.stage == "video_movq_decoder" for c in backend.calls)


@pytest.mark.parametrize("kwargs,parameter", [
    (dict(width=100), "width"), (dict(height=32), "height"), (dict(width=16448), "width"),
    (dict(width=64.0), "width"), (dict(fps="ultra"), "fps"), (dict(motion="fast"), "motion"),
    (dict(negative_prompt=3), "negative_prompt"),
    (dict(key_frame_guidance_scale=-1.0), "key_frame_guidance_scale"),
    (dict(guidance_weight_prompt=float("nan")), "guidance_weight_prompt"),
    (dict(guidance_weight_image=float("inf")), "guidance_weight_image"),
    (dict(interpolation_guidance_scale="0.5"), "interpolation_guidance_scale"),
    (dict(noise_augmentation=1000), "noise_augmentation"), (dict(noise_augmentation=2.5), "noise_augmentation"),
    (dict(seed=-1), "seed"), (dict(key_frame_steps=0), "key_frame_steps"),
    (dict(interpolation_steps=True), "interpolation_steps"),
])
def test_invalid_values_are_rejected_before_any_work(recorded, kwargs, parameter):
    pipe, backend = recorded
    with pytest.raises(InvalidRequestError) as err:
        pipe("a cat", progress=False, **kwargs)
    assert err.value.parameter == parameter
    assert repr(kwargs[parameter]) in str(err.value)
    assert backend.calls == [], "validation happens before any stage runs"


@pytest.mark.parametrize("prompt", [None, 3, b"a cat"])
def test_prompt_must_be_text(recorded, prompt):
    pipe, backend = recorded
    with pytest.raises(InvalidRequestError, match="prompt"):
        pipe(prompt, progress=False)
    assert backend.calls == []


def test_frame_area_above_the_memory_limit_is_rejected(recorded):
    pipe, backend = recorded
    with pytest.raises(InvalidRequestError, match=r"1280x1024 = 1310720 pixels.*at most 1048576 pixels"):
        pipe("a cat", width=1280, height=1024, progress=False)
    assert backend.calls == []


def test_unreadable_image(recorded, tmp_path):
    pipe, backend = recorded
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InvalidRequestError, match="cannot be read as an image"):
        pipe("a cat", bad, progress=False)
    with pytest.raises(InvalidRequestError, match="does not exist"):
        pipe("a cat", tmp_path / "missing.png", progress=False)
    assert backend.calls == []


def test_long_prompt_is_truncated_and_reported(tiny_pipeline):
    prompt = "a red car is drifting on the mountain road, close view, fast movement, at night in the rain"
    with pytest.warns(UserWarning, match="truncated"):
        out = tiny_pipeline(prompt, seed=1, **FAST)
    assert out.prompt_truncated and out.prompt_tokens == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not tiny_pipeline("a cat", seed=1, **FAST).prompt_truncated


def test_bfloat16_unets_run(tmp_path):
    pipe = KandinskyVideoPipeline.from_preset("tiny", seed=0, dtype=torch.bfloat16)
    out = pipe("a cat", seed=1, **FAST)
    assert out.frames.shape == (12, 64, 64, 3)
    assert torch.isfinite(out.latents).all()


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_video_files(tiny_pipeline, tmp_path, suffix):
    out = tiny_pipeline("a cat", seed=1, **FAST)
    path = out.save(tmp_path / f"video{suffix}")
    frames = iio.imread(path, index=None)
    assert frames.shape[0] == 12 and frames.shape[1:3] == (64, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"video{suffix}"], "no temporary file left"
