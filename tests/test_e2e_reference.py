"""End-to-end parity with the official pipeline on every reference case (recorded noise replayed).

Reference README, "Stage-wise testing": the key frame reaches the base-frame stage as a uint8 image, so
a 1e-6 change upstream can flip a few uint8 values and move later latents by ~1e-3. Each stage is
therefore fed the stored golden input of that stage and must match its golden output within the
README's stated tolerances (latents: atol; frames: |diff| <= N on at most a fraction of the uint8
values). Image-to-video cases have no such round trip and are also compared whole. The whole request is
made with the official call's own keyword arguments (meta.json), as a drop-in caller would.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kvt.contract.request import MOTION_ALIASES, MOTION_SCORES
from kvt.contract.stages import INTERPOLATION_PASSES
from kvt.models.checkpoints import load_checkpoint_dir
from kvt.runtime.images import key_frame_pixels
from kvt.runtime.noise import RecordedDraw, ReplayNoise
from kvt.runtime.pipeline import KandinskyVideoPipeline
from support import refdata
from support.recording import RecordingBackend

_KINDS = {"randn": "randn", "randn_like": "randn", "rand": "rand", "rand_like": "rand"}


def _cases() -> list[str]:
    return sorted({str(Path(f).parent) for f in refdata.files_with_prefix("e2e/")})


@dataclass
class Case:
    name: str
    folder: Path
    meta: dict
    outputs: dict
    noise_log: list
    noise: dict

    def replay(self, stage: str | None = None) -> ReplayNoise:
        draws = [RecordedDraw(_KINDS[e["fn"]], self.noise[e["tensor"]])
                 for e in self.noise_log if stage is None or e["stage"] == stage]
        return ReplayNoise(draws)

    @property
    def kwargs(self) -> dict:
        return self.meta["kwargs"]

    def image(self) -> Image.Image | None:
        """The call's image: meta.json names the file in the case folder first ("x.png (...)")."""
        if self.kwargs.get("image") is None:
            return None
        return Image.open(self.folder / str(self.kwargs["image"]).split()[0])

    def settings(self) -> dict:
        """The official knobs in effect: call kwargs over the recorded defaults (a default is recorded
        as its value, possibly followed by a comment). The official default motion 'normal' is passed
        as is; any other value the official pipeline does not know it replaces by 'medium'."""
        merged = {**self.meta["defaults_in_effect"], **self.kwargs}
        motion = str(merged["motion"]).split()[0]
        return {
            "motion": motion if motion in MOTION_SCORES or motion in MOTION_ALIASES else "medium",
            "key_frame_guidance_scale": float(merged["key_frame_guidance_scale"]),
            "guidance_weight_prompt": float(merged["guidance_weight_prompt"]),
            "guidance_weight_image": float(merged["guidance_weight_image"]),
            "interpolation_guidance_scale": float(merged["interpolation_guidance_scale"]),
            "noise_augmentation": int(merged["noise_augmentation"]),
        }


BACKENDS = ("torch", "onnxruntime")


pytestmark = pytest.mark.uses_exports("reference_export_fp32")  # the ONNX Runtime cases (conftest.py)

@pytest.fixture(scope="module")
def torch_pipeline():
    ref = refdata.require_reference()
    return KandinskyVideoPipeline.from_models(load_checkpoint_dir(ref / "checkpoints"))


@pytest.fixture(scope="module", params=BACKENDS)
def pipeline(request):
    """The same reference checkpoints on the torch backend and, exported by ``kvt export`` (FP32),
    on the ONNX Runtime backend: both must reproduce the official outputs."""
    if request.param == "torch":
        return request.getfixturevalue("torch_pipeline")
    return KandinskyVideoPipeline.from_onnx(request.getfixturevalue("reference_export_fp32"))


def _load_case(path: str) -> Case:
    folder = refdata.reference_dir() / path
    return Case(
        name=Path(path).name, folder=folder,
        meta=json.loads((folder / "meta.json").read_text()),
        outputs=refdata.load_tensors(f"{path}/outputs.safetensors"),
        noise_log=json.loads((folder / "noise_log.json").read_text()),
        noise=refdata.load_tensors(f"{path}/noise_log.safetensors"),
    )


def _assert_close(name: str, ours: torch.Tensor, golden: torch.Tensor, atol: float | None = None) -> float:
    atol = refdata.stated_e2e_latent_atol() if atol is None else atol
    assert tuple(ours.shape) == tuple(golden.shape), f"{name}: shape {list(ours.shape)} != {list(golden.shape)}"
    err = (ours.float().cpu() - golden.float()).abs().max().item()
    assert err <= atol, f"{name}: max abs error {err:.3e} > {atol:.0e}"
    return err


def _assert_frames(name: str, ours: np.ndarray, golden: torch.Tensor) -> tuple[int, float]:
    golden = golden.numpy()
    assert ours.shape == golden.shape, f"{name}: shape {ours.shape} != {golden.shape}"
    diff = np.abs(ours.astype(np.int16) - golden.astype(np.int16))
    worst, fraction = int(diff.max()), float((diff > 0).mean())
    max_diff, max_fraction = refdata.stated_e2e_frame_tolerance()
    assert worst <= max_diff and fraction <= max_fraction, \
        f"{name}: max uint8 diff {worst}, {fraction:.4%} of values differ"
    return worst, fraction


def _steps(case: Case) -> dict:
    steps = case.meta["sampler_steps"]
    return {"key_frame_steps": steps["key_frame_and_base_frames"],
            "base_frame_steps": steps["key_frame_and_base_frames"],
            "interpolation_steps": steps["interpolation"]}


@pytest.mark.parametrize("path", _cases())
def test_stage_wise(pipeline, path):
    case = _load_case(path)
    out, kw, steps, knobs = case.outputs, case.kwargs, _steps(case), case.settings()
    width, height = kw["width"], kw["height"]
    report = {}

    text = pipeline.encode_prompt(kw["prompt"])
    assert text.tokens.input_ids[0].tolist() == out["input_ids"].tolist()
    length = out["text_context"].shape[1]
    assert text.length == length
    report["text_context"] = _assert_close("text_context", text.context[:, :length], out["text_context"],
                                           refdata.recommended_atol("text_encoder"))
    assert torch.equal(text.mask[:, :length].long(), out["text_context_mask"])

    if "key_frame_latent" in out:
        noise = case.replay("key_frame")
        latent = pipeline.generate_key_frame_latent(text, width, height, knobs["key_frame_guidance_scale"],
                                                    steps["key_frame_steps"], noise)
        assert noise.exhausted
        report["key_frame_latent"] = _assert_close("key_frame_latent", latent, out["key_frame_latent"])
        decoded = np.asarray(pipeline.decode_key_frame(out["key_frame_latent"]))
        report["key_frame_image_uint8"] = _assert_frames("key_frame_image_uint8", decoded[None],
                                                         out["key_frame_image_uint8"][None])
        key_image = Image.fromarray(out["key_frame_image_uint8"].numpy())
    else:
        key_image = case.image()
        assert key_image is not None, f"{case.name}: no key frame latent and no image"
    pixels = key_frame_pixels(key_image, width, height)
    assert torch.equal(pixels, out["key_frame_pixels"]), "Pillow preprocessing must be exact"
    encoded = pipeline.encode_key_frame(key_image, width, height)
    report["key_frame_encoded"] = _assert_close("key_frame_encoded", encoded, out["key_frame_encoded"])

    recorder = RecordingBackend(pipeline.backend, keep={"unet_t2v_video": ("sample",)})
    recorded = KandinskyVideoPipeline(recorder, pipeline.tokenizer, pipeline.t2v_null_embedding,
                                      pipeline.interpolation_null_embedding)
    noise = case.replay("base_frames")
    motion_score = MOTION_SCORES[MOTION_ALIASES.get(knobs["motion"], knobs["motion"])]
    base = recorded.generate_base_frames(
        text, out["key_frame_encoded"], motion_score, knobs["guidance_weight_prompt"],
        knobs["guidance_weight_image"], knobs["noise_augmentation"], steps["base_frame_steps"], noise)
    assert noise.exhausted
    report["noise_aug.key_frame_noisy"] = _assert_close(
        "noise_aug.key_frame_noisy", recorder.calls[0].inputs["sample"][0, 4:8], out["noise_aug.key_frame_noisy"])
    report["base_frames_latents"] = _assert_close("base_frames_latents", base, out["base_frames_latents"])

    passes = INTERPOLATION_PASSES[kw["fps"]]
    if passes:
        # Every pass from the golden base frames, in order, with that stage's recorded draws in order.
        noise = case.replay("interpolation")
        video = out["base_frames_latents"]
        sampled = {}  # the sampler output of each pass, by its number of groups
        for skip_frames in passes:
            groups = video.shape[0] - 1
            video = pipeline.interpolate(text, video, skip_frames, knobs["interpolation_guidance_scale"],
                                         steps["interpolation_steps"], noise)
            sampled[groups] = torch.stack([video[4 * g + 1: 4 * g + 4].reshape(-1, *video.shape[-2:])
                                           for g in range(groups)])
        assert noise.exhausted
        report["video_latents"] = _assert_close("video_latents", video, out["video_latents"])
        if "interpolation_groups_latents" in out:
            golden = out["interpolation_groups_latents"]
            assert golden.shape[0] in sampled, f"no pass has {golden.shape[0]} groups"
            report["interpolation_groups_latents"] = _assert_close(
                "interpolation_groups_latents", sampled[golden.shape[0]], golden)
    else:
        assert torch.equal(out["video_latents"], out["base_frames_latents"])

    frames = pipeline.decode_video(out["video_latents"])
    report["frames_uint8"] = _assert_frames("frames_uint8", frames, out["frames_uint8"])
    print(f"\n{case.name} [{pipeline.backend.name}] stage-wise: " + ", ".join(f"{k} {v}" for k, v in report.items()))


@pytest.mark.parametrize("path", _cases())
def test_whole_chain(pipeline, path):
    """The full request with the recorded noise, through ``pipeline(...)``.

    Always: every recorded draw is consumed in order and the decoded key frame is within the frame
    tolerance. Downstream latents and frames are held to the stage tolerances when no uint8 value of
    the key frame flipped (the reference README's condition for whole-chain comparison): always for
    image-to-video. A flip is amplified chaotically by the rest of the chain (the official code shows
    the same under a 1-thread rerun), and those stages are covered by ``test_stage_wise``.
    """
    case = _load_case(path)
    out = case.outputs
    call = {**case.kwargs, **case.settings(), "image": case.image()}  # the official call's keywords
    noise = case.replay()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a negative_prompt or a small image is served with a warning
        result = pipeline(**call, progress=False, noise=noise, **_steps(case))
    assert noise.exhausted, "every recorded draw must be consumed, in order"
    assert result.num_frames == out["frames_uint8"].shape[0]
    key_frame_exact = True
    if "key_frame_image_uint8" in out:
        ours = np.asarray(result.key_frame)[None]
        _assert_frames("key_frame_image_uint8", ours, out["key_frame_image_uint8"][None])
        key_frame_exact = np.array_equal(ours[0], out["key_frame_image_uint8"].numpy())
    if key_frame_exact:
        _assert_close("video_latents", result.latents, out["video_latents"])
        _assert_frames("frames_uint8", result.frames, out["frames_uint8"])
    else:
        diff = np.abs(result.frames.astype(int) - out["frames_uint8"].numpy().astype(int))
        print(f"\n{case.name} [{pipeline.backend.name}]: key frame flipped uint8 values; whole-chain latents differ by "
              f"{(result.latents - out['video_latents']).abs().max().item():.2e}, frames by <= {diff.max()} "
              f"on {(diff > 0).mean():.2%} of values (not asserted; see test_stage_wise)")
