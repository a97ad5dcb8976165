"""A generation request and its validation: every user-facing value is checked before any work starts.

Errors name the parameter, the value given and what is allowed. The official pipeline silently maps an
unknown ``motion`` to 'medium' and pads small images with black; here both are errors, because a
deployment should not quietly serve something other than what was asked.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any

from PIL import Image

from kvt.contract.errors import UserError
from kvt.contract.stages import FPS_FRAMES, PIXEL_MULTIPLE, ResolutionRange

MOTION_SCORES = {"low": 1, "medium": 10, "high": 50, "extreme": 100}
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

    @property
    def num_frames(self) -> int:
        return FPS_FRAMES[self.fps]

    @property
    def motion_score(self) -> int:
        return MOTION_SCORES[self.motion]

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


def validate_request(request: GenerationRequest, resolution: ResolutionRange) -> GenerationRequest:
    """Return ``request`` if every value is acceptable, else raise :class:`InvalidRequestError`."""
    if not isinstance(request.prompt, str):
        raise InvalidRequestError("prompt", _short(request.prompt), "a string")
    if not request.prompt.strip():
        raise InvalidRequestError("prompt", request.prompt, "a non-empty text description")
    if len(request.prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequestError("prompt", f"<{len(request.prompt)} characters>",
                                  f"at most {MAX_PROMPT_CHARS} characters (the model reads 128 tokens)")
    if "\x00" in request.prompt:
        raise InvalidRequestError("prompt", _short(request.prompt), "text without NUL characters")
    for name in ("width", "height"):
        value = getattr(request, name)
        allowed = (f"a multiple of {PIXEL_MULTIPLE} in [{resolution.min}, {resolution.max}] "
                   f"(the U-Net has three stride-2 levels on the 1/8 latent)")
        if not _is_int(value) or value % PIXEL_MULTIPLE or not resolution.min <= value <= resolution.max:
            raise InvalidRequestError(name, value, allowed)
    if not isinstance(request.fps, str) or request.fps not in FPS_FRAMES:
        raise InvalidRequestError("fps", _short(request.fps), f"one of {list(FPS_FRAMES)}")
    if not isinstance(request.motion, str) or request.motion not in MOTION_SCORES:
        raise InvalidRequestError("motion", _short(request.motion), f"one of {list(MOTION_SCORES)}")
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
    return request


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
    MAX_IMAGE_PIXELS in all, and at least as large as the output frame."""
    if not isinstance(image, Image.Image):
        raise InvalidRequestError("image", type(image).__name__, "a PIL image or a path to an image file")
    w, h = image.size
    if w > MAX_IMAGE_SIDE or h > MAX_IMAGE_SIDE or w * h > MAX_IMAGE_PIXELS:
        raise InvalidRequestError("image", f"{w}x{h} pixels",
                                  f"at most {MAX_IMAGE_SIDE} pixels per side and {MAX_IMAGE_PIXELS} in all")
    if image.mode not in IMAGE_MODES:
        raise InvalidRequestError("image", f"mode {image.mode}", f"one of the modes {list(IMAGE_MODES)}")
    if w < width or h < height:
        raise InvalidRequestError(
            "image", f"{w}x{h} pixels",
            f"at least the output size {width}x{height}: the pipeline only downscales, a smaller image "
            f"would be padded with black (resize it, or ask for a smaller width/height)")
