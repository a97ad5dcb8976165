"""A generation request and its validation: every user-facing value is checked before any work starts.

What the official ``KandinskyVideoT2VPipeline.__call__`` accepts is accepted (drop-in callers pass it),
with a warning where it is probably a mistake (:func:`request_warnings`):

* ``motion='normal'``, the official default, means 'medium' (the official code maps it there);
* an image smaller than the output is not upscaled: the centre crop pads it with black, as officially;
* an empty prompt is encoded as EOS only, as officially;
* ``negative_prompt`` is accepted and has no effect, as officially (its ``__call__`` ignores it);
* any multiple of 64 runs on the torch and ONNX Runtime backends, within the memory-based limit
  ``MAX_FRAME_PIXELS`` (engines and Triton serve the range they were built for).

Refused, with an error naming the parameter, the value and what is allowed: what would crash the
official code (sizes that are not multiples of 64) or run unbounded (huge step counts, prompts, images),
other unknown ``motion`` / ``fps`` values (the official code falls back to medium / low for any value;
here a misspelt option is an error) and non-finite or out-of-range numbers.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any

from PIL import Image

from kvt.contract.errors import UserError
from kvt.contract.stages import FPS_FRAMES, MAX_FRAME_PIXELS, PIXEL_MULTIPLE, ResolutionRange

MOTION_SCORES = {"low": 1, "medium": 10, "high": 50, "extreme": 100}
# Motion values the official pipeline accepts besides MOTION_SCORES: its own default 'normal', which it
# maps to 'medium' (t2v_pipeline.py: "motion must be in ... set default speed to medium").
MOTION_ALIASES = {"normal": "medium"}
MAX_GUIDANCE = 100.0
MAX_STEPS = 1000
MAX_NOISE_AUGMENTATION = 999  # a training timestep
MAX_SEED = 2**63 - 1
# Limits that bound the work a request can cause before any model runs (spec: 128 tokens are read;
# a prompt is tokenized whole before truncation, so its length is bounded too).
MAX_PROMPT_CHARS = 4096
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = 4096 * 4096
IMAGE_MODES = ("RGB", "RGBA", "L", "LA", "P", "CMYK", "YCbCr", "I;16", "I", "F", "1")


class InvalidRequestError(UserError):
    """A request parameter is outside what the pipeline accepts."""

    def __init__(self, parameter: str, value: Any, allowed: str) -> None:
        self.parameter = parameter
        self.value = value
        self.allowed = allowed
        super().__init__(f"{parameter}={value!r} is not allowed: {allowed}")


@dataclass(frozen=True)
class GenerationRequest:
    """Every official knob of ``KandinskyVideoT2VPipeline.__call__`` plus seed and step counts.

    The defaults below are the official ones and their only home: the pipeline's keyword arguments, the
    CLI's options, the samplers, the Triton client and the benchmarks all read them from this class.
    """

    prompt: str
    image: Image.Image | None = None
    width: int = 512
    height: int = 512
    fps: str = "low"
    motion: str = "medium"
    key_frame_guidance_scale: float = 5.0
    guidance_weight_prompt: float = 5.0
    guidance_weight_image: float = 2.0
    interpolation_guidance_scale: float = 0.5
    noise_augmentation: int = 20
    seed: int | None = None
    key_frame_steps: int = 50
    base_frame_steps: int = 50
    interpolation_steps: int = 10
    # Accepted and ignored, as by the official __call__ (a warning says so).
    negative_prompt: str | None = None

    @property
    def num_frames(self) -> int:
        return FPS_FRAMES[self.fps]

    @property
    def motion_score(self) -> int:
        return MOTION_SCORES[MOTION_ALIASES.get(self.motion, self.motion)]

    def with_seed(self, seed: int) -> GenerationRequest:
        return replace(self, seed=seed)


def request_defaults() -> dict[str, Any]:
    """Field name -> default of every request field that has one (the official defaults)."""
    return {f.name: f.default for f in fields(GenerationRequest) if f.default is not MISSING}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if not _is_int(value) or not low <= value <= high:
        raise InvalidRequestError(name, value, f"an integer in [{low}, {high}]")


def _check_guidance(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(name, value, f"a number in [0, {MAX_GUIDANCE:g}]")
    if not math.isfinite(value) or not 0.0 <= value <= MAX_GUIDANCE:
        raise InvalidRequestError(name, value, f"a finite number in [0, {MAX_GUIDANCE:g}]")


def _check_text(name: str, value: str) -> None:
    if len(value) > MAX_PROMPT_CHARS:
        raise InvalidRequestError(name, f"<{len(value)} characters>",
                                  f"at most {MAX_PROMPT_CHARS} characters (the model reads 128 tokens)")
    if "\x00" in value:
        raise InvalidRequestError(name, _short(value), "text without NUL characters")


def _check_size(request: GenerationRequest, resolution: ResolutionRange) -> None:
    for name in ("width", "height"):
        value = getattr(request, name)
        allowed = (f"a multiple of {PIXEL_MULTIPLE} in [{resolution.min}, {resolution.max}] "
                   f"(the U-Net has three stride-2 levels on the 1/8 latent)")
        if not _is_int(value) or value % PIXEL_MULTIPLE or not resolution.min <= value <= resolution.max:
            raise InvalidRequestError(name, value, allowed)
    if resolution.max_pixels is not None and request.width * request.height > resolution.max_pixels:
        raise InvalidRequestError(
            "width x height", f"{request.width}x{request.height} = {request.width * request.height} pixels",
            f"at most {resolution.max_pixels} pixels (the memory-based limit MAX_FRAME_PIXELS = "
            f"{MAX_FRAME_PIXELS}: activation memory grows with the frame area; any aspect ratio within it)")


def validate_request(request: GenerationRequest, resolution: ResolutionRange) -> GenerationRequest:
    """The request to run: ``request`` with the official aliases resolved (``motion='normal'`` ->
    'medium') if every value is acceptable, else :class:`InvalidRequestError`. What it accepts but was
    probably not meant is reported by :func:`request_warnings`."""
    if not isinstance(request.prompt, str):
        raise InvalidRequestError("prompt", _short(request.prompt), "a string (it may be empty)")
    _check_text("prompt", request.prompt)
    if request.negative_prompt is not None:
        if not isinstance(request.negative_prompt, str):
            raise InvalidRequestError("negative_prompt", _short(request.negative_prompt),
                                      "a string or None (it has no effect, as in the official pipeline)")
        _check_text("negative_prompt", request.negative_prompt)
    _check_size(request, resolution)
    if not isinstance(request.fps, str) or request.fps not in FPS_FRAMES:
        raise InvalidRequestError("fps", _short(request.fps), f"one of {list(FPS_FRAMES)}")
    if not isinstance(request.motion, str) or (request.motion not in MOTION_SCORES
                                               and request.motion not in MOTION_ALIASES):
        raise InvalidRequestError("motion", _short(request.motion),
                                  f"one of {list(MOTION_SCORES)} (or 'normal', the official default: medium)")
    for name in ("key_frame_guidance_scale", "guidance_weight_prompt", "guidance_weight_image",
                 "interpolation_guidance_scale"):
        _check_guidance(name, getattr(request, name))
    _check_int("noise_augmentation", request.noise_augmentation, 0, MAX_NOISE_AUGMENTATION)
    if request.seed is not None:
        _check_int("seed", request.seed, 0, MAX_SEED)
    for name in ("key_frame_steps", "base_frame_steps", "interpolation_steps"):
        _check_int(name, getattr(request, name), 1, MAX_STEPS)
    if request.image is not None:
        check_image(request.image, request.width, request.height)
    if request.motion in MOTION_ALIASES:
        request = replace(request, motion=MOTION_ALIASES[request.motion])
    return request


def request_warnings(request: GenerationRequest) -> tuple[str, ...]:
    """What a valid request asks that is served as the official pipeline serves it but was probably
    not meant: one sentence each (the pipeline warns with them and returns them with the video)."""
    out = []
    if request.negative_prompt is not None:
        out.append(f"negative_prompt={_short(request.negative_prompt)!r} has no effect: the official "
                   "Kandinsky Video 1.1 pipeline accepts and ignores it, and so does this one")
    if isinstance(request.prompt, str) and not request.prompt.strip():
        out.append(f"prompt={request.prompt!r} is empty: it is encoded as the end-of-sequence token only, "
                   "as the official pipeline does")
    if isinstance(request.image, Image.Image):
        padding = image_padding(request.image, request.width, request.height)
        if padding is not None:
            out.append(padding)
    return tuple(out)


def image_padding(image: Image.Image, width: int, height: int) -> str | None:
    """The notice for an image smaller than the output frame in width or height, else None.

    The official preprocessing never upscales (resize factor max(1, min(w/W, h/H))); its centre crop
    pads what is missing with zeros in the image's own mode, which the RGB conversion after the crop
    turns into black (white for CMYK, palette entry 0 for palette images): :func:`padding_colour`.
    """
    w, h = image.size
    if w >= width and h >= height:
        return None
    colour = padding_colour(image)
    name = "black" if colour == (0, 0, 0) else f"RGB {colour}"
    return (f"image {w}x{h} is smaller than the output frame {width}x{height}: as in the official "
            f"pipeline it is not upscaled, and the centre crop pads the missing {max(width - w, 0)} "
            f"columns and {max(height - h, 0)} rows with {name} (zeros in image mode {image.mode}); "
            f"resize it to at least {width}x{height} to avoid the border")


def padding_colour(image: Image.Image) -> tuple[int, int, int]:
    """The RGB colour the official crop pads ``image`` with: a zero pixel of its mode, converted."""
    pad = Image.new(image.mode, (1, 1))
    if image.mode in ("P", "PA") and image.palette is not None:
        pad.putpalette(image.getpalette() or [0, 0, 0])
    value = pad.convert("RGB").getpixel((0, 0))
    assert isinstance(value, tuple)
    return (int(value[0]), int(value[1]), int(value[2]))


def _short(value: Any, limit: int = 80) -> Any:
    """A value as it may appear in an error message: long texts and containers are cut."""
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "..."
    if isinstance(value, bytes) and len(value) > limit:
        return value[:limit] + b"..."
    if isinstance(value, (int, float, bool, type(None), str, bytes)):
        return value
    text = repr(value)
    return f"<{type(value).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}>"


def check_image(image: Any, width: int, height: int) -> None:
    """The conditioning image: a PIL image of a known mode, at most MAX_IMAGE_SIDE per side and
    MAX_IMAGE_PIXELS in all. An image smaller than the output frame is accepted and padded, as by the
    official pipeline (:func:`image_padding`)."""
    if not isinstance(image, Image.Image):
        raise InvalidRequestError("image", type(image).__name__, "a PIL image or a path to an image file")
    w, h = image.size
    if w > MAX_IMAGE_SIDE or h > MAX_IMAGE_SIDE or w * h > MAX_IMAGE_PIXELS:
        raise InvalidRequestError("image", f"{w}x{h} pixels",
                                  f"at most {MAX_IMAGE_SIDE} pixels per side and {MAX_IMAGE_PIXELS} in all")
    if image.mode not in IMAGE_MODES:
        raise InvalidRequestError("image", f"mode {image.mode}", f"one of the modes {list(IMAGE_MODES)}")
    if w < 1 or h < 1:
        raise InvalidRequestError("image", f"{w}x{h} pixels", "at least one pixel")
