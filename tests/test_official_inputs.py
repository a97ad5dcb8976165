"""Inputs the official pipeline accepts, accepted here too: each compared with the official behaviour.

Drop-in callers of ``KandinskyVideoT2VPipeline.__call__`` pass these (issue 16, item 2; review
fidelity.md D6). The official behaviour each test holds us to is cited from docs/spec:

* ``motion='normal'``: the official default, not a key of its table, "→ warning → medium 10"
  (sampling.md, loop B; quirks.md 24);
* an image smaller than the frame: "not upscaled: the crop pads with black" (quirks.md 16);
* an empty prompt: the official processor tokenizes it like any text, i.e. EOS only (text_encoder.md);
* ``negative_prompt``: "ignored" (quirks.md 4);
* any multiple of 64: "sizes must be multiples of 64 ... other sizes fail" (quirks.md 35; deployment.md:
  "no positional encodings ..., so any such size runs"), here within the memory-based limit.

The image preprocessing of every PIL mode (what a server must do with a client's lossless image,
fidelity.md D1) is compared with a transcription of the official ``encode_image``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from kvt.contract.request import (
    IMAGE_MODES,
    MOTION_SCORES,
    GenerationRequest,
    InvalidRequestError,
    padding_colour,
    request_warnings,
    validate_request,
)
from kvt.contract.stages import MAX_FRAME_PIXELS, ResolutionRange, any_size_range
from kvt.runtime.backends.tensorrt.backend import TensorRTBackend
from kvt.runtime.images import ImageInputError, key_frame_image, key_frame_pixels, load_image
from kvt.runtime.pipeline import KandinskyVideoPipeline
from kvt.serving.protocol import arrays_to_request, request_to_arrays, uncovered_request_fields
from kvt.serving.server_models.stage_backend import TritonStageBackend
from support.recording import RecordingBackend

FAST = dict(key_frame_steps=2, base_frame_steps=2, interpolation_steps=1, progress=False)


def _gradient(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x * y) % 256], axis=-1)
    return np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# the official preprocessing, transcribed from t2v_pipeline.py (encode_image + image_transform)


def official_pixels(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """``KandinskyVideoT2VPipeline.encode_image`` up to the MoVQ: resize / crop in the image's own
    mode, ``img.convert('RGB') if img.mode != 'RGB'``, ``ToTensor``, ``2x - 1`` ([3, H, W])."""
    reduce_factor = max(1, min(image.size[0] / width, image.size[1] / height))
    image = image.resize((round(image.size[0] / reduce_factor), round(image.size[1] / reduce_factor)))
    old_width, old_height = image.size
    left = (old_width - width) / 2
    top = (old_height - height) / 2
    right = (old_width + width) / 2
    bottom = (old_height + height) / 2
    image = image.crop((left, top, right, bottom))
    image = image.convert("RGB") if image.mode != "RGB" else image
    tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
    return 2.0 * tensor - 1.0


def _image(mode: str, width: int, height: int, under_transparency: int = 255) -> Image.Image:
    """A test image of ``mode``: a noisy gradient; RGBA / LA have a transparent right half whose
    colour channels hold ``under_transparency`` (cut-out PNGs store white or black there)."""
    rgb = _gradient(width, height)
    if mode in ("RGBA", "LA"):
        alpha = np.full((height, width), 255, np.uint8)
        alpha[:, width // 2:] = 0
        rgb = rgb.copy()
        rgb[:, width // 2:] = under_transparency
        colour = Image.fromarray(rgb).convert("L" if mode == "LA" else "RGB")
        colour.putalpha(Image.fromarray(alpha))
        return colour
    if mode == "P":
        return Image.fromarray(rgb).quantize(64)
    if mode in ("I;16", "I", "F"):
        return Image.fromarray(rgb).convert("L").convert(mode)
    return Image.fromarray(rgb).convert(mode)


SIZES = [(160, 96), (130, 77), (64, 64), (300, 101), (41, 50), (200, 40)]  # bigger, odd, equal, small


@pytest.mark.parametrize("mode", IMAGE_MODES)
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_preprocessing_of_every_mode_is_the_official_one(mode: str, size: tuple[int, int]) -> None:
    """key_frame_pixels on an image of any mode = the official encode_image pixels, bit for bit, for
    larger, odd, equal and smaller images (fidelity.md §2.3: 270 / 270 identical with the real code)."""
    image = _image(mode, *size)
    assert image.mode == mode
    for width, height in ((64, 64), (128, 64)):
        ours = key_frame_pixels(image, width, height)
        assert ours.shape == (1, 3, height, width)
        assert torch.equal(ours[0], official_pixels(image, width, height)), (mode, size, width, height)


def _convert_first(image: Image.Image, width: int, height: int) -> np.ndarray:
    """What a client that converts to RGB before sending gets (the Triton path of fidelity.md D1)."""
    return np.asarray(key_frame_image(image.convert("RGB"), width, height))


def test_rgba_white_under_transparency_resizes_with_premultiplied_alpha() -> None:
    """fidelity.md D1: Pillow resizes RGBA with premultiplied alpha, so the white stored under the
    transparent half comes out black; converting to RGB first keeps it white (66 % of pixels differed
    on the review's cut-out)."""
    image = _image("RGBA", 256, 160, under_transparency=255)
    ours = np.asarray(key_frame_image(image, 128, 80))
    first = _convert_first(image, 128, 80)
    transparent = ours[:, 66:]  # well inside the transparent half after the 2x downscale
    assert (transparent == 0).all(), "colour under transparent pixels must not bleed in"
    assert (first[:, 66:] == 255).all()
    assert (ours != first).any(axis=-1).mean() > 0.4


def test_rgba_black_under_transparency_differs_only_at_edges() -> None:
    image = _image("RGBA", 256, 160, under_transparency=0)
    ours = np.asarray(key_frame_image(image, 128, 80))
    differing = (ours != _convert_first(image, 128, 80)).any(axis=-1)
    assert 0 < differing.mean() < 0.1
    assert not differing[:, :60].any() and not differing[:, 68:].any(), "only around the alpha edge"


def test_la_resizes_with_premultiplied_alpha() -> None:
    image = _image("LA", 256, 160, under_transparency=255)
    ours = np.asarray(key_frame_image(image, 128, 80))
    assert (ours[:, 66:] == 0).all()
    assert (ours != _convert_first(image, 128, 80)).any(axis=-1).mean() > 0.4


def test_palette_image_resizes_with_nearest() -> None:
    """Pillow's default filter for palette images is NEAREST: every output colour is a palette
    colour; resizing the RGB conversion (bicubic) makes new colours (fidelity.md D1: 48 % differ)."""
    image = _image("P", 256, 160)
    palette = np.array(image.getpalette()[:3 * 64]).reshape(-1, 3)
    ours = np.asarray(key_frame_image(image, 128, 80)).reshape(-1, 3)
    assert all((palette == pixel).all(axis=1).any() for pixel in np.unique(ours, axis=0))
    first = _convert_first(image, 128, 80).reshape(-1, 3)
    assert not all((palette == pixel).all(axis=1).any() for pixel in np.unique(first, axis=0))


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_rgb_and_grey_images_do_not_depend_on_the_order(mode: str) -> None:
    image = _image(mode, 256, 160)
    assert np.array_equal(np.asarray(key_frame_image(image, 128, 80)), _convert_first(image, 128, 80))


def test_cmyk_is_resized_in_cmyk_then_converted() -> None:
    image = _image("CMYK", 256, 160)
    in_mode = image.resize((128, 80)).convert("RGB")
    assert np.array_equal(np.asarray(key_frame_image(image, 128, 80)), np.asarray(in_mode))


def test_lossless_image_bytes_keep_the_mode(tmp_path) -> None:
    """A server can be sent an image file's bytes (e.g. PNG): it decodes in the stored mode, so the
    official preprocessing above applies to the client's own pixels."""
    for mode in ("RGBA", "LA", "P", "L", "RGB", "1", "I;16"):
        image = _image(mode, 90, 70)
        path = tmp_path / f"{mode.replace(';', '_')}.png"
        image.save(path)
        decoded = load_image(path.read_bytes())
        assert decoded.mode == image.mode, mode
        assert np.array_equal(np.asarray(decoded), np.asarray(image)), mode
        assert torch.equal(key_frame_pixels(decoded, 64, 64), key_frame_pixels(image, 64, 64)), mode
    with pytest.raises(ImageInputError, match="cannot be read as an image"):
        load_image(b"not an image")


@pytest.mark.parametrize("mode", IMAGE_MODES)
def test_the_wire_carries_the_image_in_its_own_mode(mode: str) -> None:
    """The Triton client sends the image losslessly in its own mode (IMAGE_FILE) and the server side
    decodes the same mode, size, pixels and palette, so it preprocesses exactly what an in-process run
    does (converting to RGB on the client, as before, gave other pixels: fidelity.md D1)."""
    image = _image(mode, 90, 70)
    arrays = request_to_arrays(GenerationRequest("a cat", width=64, height=64, image=image))
    assert "IMAGE" not in arrays and arrays["IMAGE_FILE"].dtype == np.object_
    served = arrays_to_request(arrays, (64, 64)).image
    assert served is not None and served.mode == image.mode and served.size == image.size
    assert np.array_equal(np.asarray(served), np.asarray(image)) and served.getpalette() == image.getpalette()
    assert torch.equal(key_frame_pixels(served, 64, 64), official_pixels(image, 64, 64)[None])


def test_the_wire_refuses_unreadable_or_double_images() -> None:
    arrays = request_to_arrays(GenerationRequest("a cat", width=64, height=64, image=_image("RGB", 70, 70)))
    with pytest.raises(InvalidRequestError, match="IMAGE_FILE=.*cannot be read as an image"):
        arrays_to_request({**arrays, "IMAGE_FILE": np.array([b"not an image"], np.object_)}, (64, 64))
    with pytest.raises(InvalidRequestError, match="IMAGE_FILE=.*bytes of an image file"):
        arrays_to_request({**arrays, "IMAGE_FILE": np.array([3], np.int32)}, (64, 64))
    with pytest.raises(InvalidRequestError, match="one image: IMAGE or IMAGE_FILE"):
        arrays_to_request({**arrays, "IMAGE": np.zeros((70, 70, 3), np.uint8)}, (64, 64))
    raw = arrays_to_request({"PROMPT": arrays["PROMPT"], "IMAGE": np.full((70, 70, 3), 9, np.uint8)}, (64, 64))
    assert raw.image is not None and raw.image.mode == "RGB"  # raw RGB pixels are still accepted


# --------------------------------------------------------------------------------------------------
# an image smaller than the frame: padded as officially


@pytest.mark.parametrize("mode, colour", [("RGB", (0, 0, 0)), ("L", (0, 0, 0)), ("RGBA", (0, 0, 0)),
                                          ("LA", (0, 0, 0)), ("CMYK", (255, 255, 255)), ("P", None)])
@pytest.mark.parametrize("size", [(41, 50), (200, 40), (64, 30)])
def test_small_image_is_padded_like_the_official_crop(mode: str, colour, size: tuple[int, int]) -> None:
    """quirks.md 16: not upscaled; the centre crop pads with zeros of the mode (black; white for CMYK,
    palette entry 0 for P: fidelity.md §2.3). The image's own pixels keep their place (Pillow rounds the
    float crop box half to even)."""
    image = _image(mode, *size)
    width, height = 64, 64
    out = np.asarray(key_frame_image(image, width, height))
    expected_colour = colour if colour is not None else tuple(image.getpalette()[:3])
    assert padding_colour(image) == expected_colour
    w, h = image.size
    left, top = round((w - width) / 2), round((h - height) / 2)
    inside = np.zeros((height, width), bool)
    inside[max(-top, 0):min(h - top, height), max(-left, 0):min(w - left, width)] = True
    assert (out[~inside] == expected_colour).all()
    source = np.asarray(image.convert("RGB"))
    ys, xs = np.nonzero(inside)
    assert np.array_equal(out[ys, xs], source[ys + top, xs + left])
    notice = request_warnings(GenerationRequest("a cat", image=image, width=width, height=height))
    assert len(notice) == 1 and f"image {w}x{h} is smaller than the output frame 64x64" in notice[0]
    assert ("with black" in notice[0]) == (expected_colour == (0, 0, 0))


def test_small_image_is_served_with_a_warning(tiny_pipeline) -> None:
    image = Image.fromarray(_gradient(48, 40))
    with pytest.warns(UserWarning, match="image 48x40 is smaller than the output frame 64x64"):
        out = tiny_pipeline("a boat", image, seed=2, **FAST)
    assert out.frames.shape == (12, 64, 64, 3)
    assert out.key_frame is image
    assert any("smaller than the output frame" in w for w in out.warnings)


# --------------------------------------------------------------------------------------------------
# motion 'normal', empty prompt, negative_prompt


@pytest.fixture()
def recorded(tiny_pipeline):
    backend = RecordingBackend(tiny_pipeline.backend, keep={"unet_t2v_video": ("motion_score",)})
    pipe = KandinskyVideoPipeline(backend, tiny_pipeline.tokenizer, tiny_pipeline.t2v_null_embedding,
                                  tiny_pipeline.interpolation_null_embedding, (64, 64))
    return pipe, backend


def test_motion_normal_is_the_official_default_medium(recorded) -> None:
    """sampling.md loop B: 'normal' (the official default) -> medium, motion score 10. It is the
    official default, so no warning."""
    pipe, backend = recorded
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normal = pipe("a cat", seed=3, motion="normal", **FAST)
    scores = {float(v) for call in backend.calls if call.stage == "unet_t2v_video"
              for v in call.inputs["motion_score"]}
    assert scores == {float(MOTION_SCORES["medium"])} == {10.0}
    assert normal.request.motion == "medium" and normal.warnings == ()
    medium = pipe("a cat", seed=3, motion="medium", **FAST)
    assert np.array_equal(normal.frames, medium.frames)


def test_other_unknown_motion_stays_an_error(recorded) -> None:
    pipe, backend = recorded
    with pytest.raises(InvalidRequestError, match=r"motion='fast'.*'normal'"):
        pipe("a cat", motion="fast", progress=False)
    assert backend.calls == []


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_eos_only(tiny_pipeline, prompt: str) -> None:
    """The official processor tokenizes any text with T5Tokenizer(text, max_length=S, truncation=True)
    and pads with 0 (condition_processors.py); for an empty prompt that is the EOS token alone, and the
    encoder keeps max(mask.sum) + 1 = 2 context positions."""
    from transformers import T5Tokenizer

    tokenizer = tiny_pipeline.tokenizer
    official = T5Tokenizer.from_pretrained(str(tokenizer.folder))
    encoded = official(prompt, max_length=tokenizer.tokens_length, truncation=True)
    pad = tokenizer.tokens_length - len(encoded["input_ids"])
    official_ids = encoded["input_ids"] + [official.pad_token_id] * pad
    official_mask = encoded["attention_mask"] + [0] * pad
    assert encoded["input_ids"] == [official.eos_token_id]

    text = tiny_pipeline.encode_prompt(prompt)
    assert text.tokens.input_ids[0].tolist() == official_ids
    assert text.tokens.attention_mask[0].tolist() == official_mask
    assert text.length == 2
    assert (text.context[0, 1:] == 0).all() and text.context[0, 0].abs().sum() > 0

    with pytest.warns(UserWarning, match="is empty: it is encoded as the end-of-sequence token only"):
        out = tiny_pipeline(prompt, seed=4, **FAST)
    assert out.frames.shape == (12, 64, 64, 3) and out.prompt_tokens == 1


def test_negative_prompt_is_accepted_and_has_no_effect(tiny_pipeline) -> None:
    """quirks.md 4: the official __call__ takes negative_prompt and never uses it."""
    with pytest.warns(UserWarning, match="negative_prompt='blurry, low quality' has no effect"):
        with_negative = tiny_pipeline("a cat", negative_prompt="blurry, low quality", seed=5, **FAST)
    without = tiny_pipeline("a cat", seed=5, **FAST)
    assert np.array_equal(with_negative.frames, without.frames)
    assert with_negative.request.negative_prompt == "blurry, low quality"
    assert len(with_negative.warnings) == 1 and without.warnings == ()


def test_protocol_carries_negative_prompt() -> None:
    """The Triton wire format carries every request field, negative_prompt included."""
    assert uncovered_request_fields() == set()
    request = GenerationRequest("a cat", width=64, height=64, negative_prompt="blurry")
    arrays = request_to_arrays(request)
    assert arrays["NEGATIVE_PROMPT"].tolist() == [b"blurry"]
    assert arrays_to_request(arrays, (64, 64)).negative_prompt == "blurry"
    assert "NEGATIVE_PROMPT" not in request_to_arrays(GenerationRequest("a cat"))


# --------------------------------------------------------------------------------------------------
# frame sizes: any multiple of 64 within the memory-based limit on torch and ONNX Runtime


@pytest.mark.parametrize("width, height", [(1280, 768), (192, 128), (64, 64), (4096, 256), (1024, 1024)])
def test_official_sizes_are_accepted_within_the_memory_limit(width: int, height: int) -> None:
    request = validate_request(GenerationRequest("a cat", width=width, height=height), any_size_range())
    assert request.width * request.height <= MAX_FRAME_PIXELS


@pytest.mark.parametrize("width, height, parameter", [
    (1280, 1024, "width x height"), (100, 64, "width"), (64, 96, "height"), (16448, 64, "width")])
def test_sizes_the_official_code_cannot_run_or_over_the_limit_are_refused(width, height, parameter) -> None:
    with pytest.raises(InvalidRequestError) as err:
        validate_request(GenerationRequest("a cat", width=width, height=height), any_size_range())
    assert err.value.parameter == parameter


def test_engines_and_triton_serve_the_built_range() -> None:
    assert not TensorRTBackend.any_frame_size and not TritonStageBackend.any_frame_size
    with pytest.raises(InvalidRequestError, match="width=192"):
        validate_request(GenerationRequest("a cat", width=192, height=256), ResolutionRange(256, 512, 1024))


def test_torch_runs_a_size_outside_the_preset_range(tiny_pipeline) -> None:
    """The tiny preset's stage ranges stop at 256; the torch backend serves 320 x 128 as the official
    code would (frames [12, 128, 320, 3], the key frame generated at 640 x 256)."""
    out = tiny_pipeline("a cat", width=320, height=128, seed=6, **FAST)
    assert out.frames.shape == (12, 128, 320, 3)
    assert out.key_frame.size == (640, 256)


def test_onnxruntime_runs_a_size_outside_the_export_range(tiny_export_fp32, tiny_checkpoint_dir) -> None:
    """The FP32 export's ranges stop at 256; ONNX Runtime runs 320 x 64 and matches torch on the same
    checkpoints (image-to-video: no uint8 key-frame round trip to amplify float noise)."""
    onnx = KandinskyVideoPipeline.from_onnx(tiny_export_fp32, device="cpu")
    assert onnx.table.resolution.max > 256
    torch_pipe = KandinskyVideoPipeline.from_checkpoint_dir(tiny_checkpoint_dir)
    image = Image.fromarray(_gradient(400, 90))
    kwargs = dict(width=320, height=64, seed=7, **FAST)
    a, b = onnx("a boat", image, **kwargs), torch_pipe("a boat", image, **kwargs)
    assert a.frames.shape == (12, 64, 320, 3)
    assert (a.latents - b.latents).abs().max().item() < 1e-3
    diff = np.abs(a.frames.astype(int) - b.frames.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
