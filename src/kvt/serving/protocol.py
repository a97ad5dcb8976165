"""The wire format of the orchestrator models (``kandinsky_video`` and ``kandinsky_video_stream``).

One table of request inputs, shared by the config generator (config.pbtxt ``input``), the server
(arrays -> :class:`GenerationRequest`) and the client (request -> arrays), so the three cannot drift.
Guidance scales travel as FP64 so that a server run equals an in-process run of the same Python
floats. Every input but PROMPT is optional: an omitted knob takes the server's default (the official one, and
the export's opt size for WIDTH / HEIGHT). The image travels in its own mode, losslessly, as the bytes of
an image file (IMAGE_FILE: PNG, or TIFF for modes PNG cannot hold), never as a path: the server reads no
file a client names, and does the official preprocessing (resize in the image's mode, crop, then RGB), so
RGBA, LA, palette and CMYK images give the frames of an in-process run. Raw RGB pixels (IMAGE) are
accepted too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from kvt.contract.dtypes import DType
from kvt.contract.request import GenerationRequest, InvalidRequestError
from kvt.runtime.images import ImageInputError, load_image, lossless_image_bytes


@dataclass(frozen=True)
class Field:
    """One request input: its Triton name, the GenerationRequest field and its element type."""

    name: str
    attribute: str
    dtype: DType

    @property
    def triton_type(self) -> str:  # config.pbtxt data_type
        return self.dtype.triton

    @property
    def wire_type(self) -> str:  # tritonclient datatype string
        return self.dtype.wire

    @property
    def numpy(self) -> Any:
        return self.dtype.numpy.type


_scalar = Field


PROMPT = "PROMPT"  # the one required input
SCALAR_FIELDS: tuple[Field, ...] = (
    _scalar(PROMPT, "prompt", DType.STRING),
    _scalar("WIDTH", "width", DType.INT32),
    _scalar("HEIGHT", "height", DType.INT32),
    _scalar("FPS", "fps", DType.STRING),
    _scalar("MOTION", "motion", DType.STRING),
    _scalar("KEY_FRAME_GUIDANCE_SCALE", "key_frame_guidance_scale", DType.FP64),
    _scalar("GUIDANCE_WEIGHT_PROMPT", "guidance_weight_prompt", DType.FP64),
    _scalar("GUIDANCE_WEIGHT_IMAGE", "guidance_weight_image", DType.FP64),
    _scalar("INTERPOLATION_GUIDANCE_SCALE", "interpolation_guidance_scale", DType.FP64),
    _scalar("NOISE_AUGMENTATION", "noise_augmentation", DType.INT32),
    _scalar("SEED", "seed", DType.INT64),
    _scalar("KEY_FRAME_STEPS", "key_frame_steps", DType.INT32),
    _scalar("BASE_FRAME_STEPS", "base_frame_steps", DType.INT32),
    _scalar("INTERPOLATION_STEPS", "interpolation_steps", DType.INT32),
    _scalar("NEGATIVE_PROMPT", "negative_prompt", DType.STRING),  # accepted and ignored, as officially
)
IMAGE = "IMAGE"  # uint8 RGB [H, W, 3], optional: image-to-video from raw RGB pixels
IMAGE_FILE = "IMAGE_FILE"  # BYTES [1], optional: image-to-video from an image file of any mode
IMAGE_INPUTS = (IMAGE, IMAGE_FILE)

# Outputs: (name, config data_type, dims).
RESULT_OUTPUTS = (
    ("FRAMES", DType.UINT8, [-1, -1, -1, 3]),  # [T, H, W, 3]
    ("SEED", DType.INT64, [1]),
    ("PROMPT_TOKENS", DType.INT32, [1]),
    ("PROMPT_TRUNCATED", DType.BOOL, [1]),
    ("TIMINGS", DType.STRING, [1]),  # JSON: seconds per part of the request
)
PROGRESS_OUTPUTS = (  # streamed by kandinsky_video_stream after every sampler step
    ("STAGE", DType.STRING, [1]),
    ("STEP", DType.INT32, [1]),
    ("NUM_STEPS", DType.INT32, [1]),
)



def uncovered_request_fields() -> set[str]:
    """GenerationRequest fields the wire format does not carry (a test keeps this empty)."""
    return {f.name for f in fields(GenerationRequest)} - {f.attribute for f in SCALAR_FIELDS} - {"image"}


# ------------------------------------------------------------------------------------- client side

def request_to_arrays(request: GenerationRequest) -> dict[str, np.ndarray]:
    """The inputs of one request; knobs that are None (seed, size) are left to the server."""
    arrays: dict[str, np.ndarray] = {}
    for field in SCALAR_FIELDS:
        value = getattr(request, field.attribute)
        if value is None:
            continue
        if field.wire_type == "BYTES":
            arrays[field.name] = np.array([str(value).encode("utf-8")], dtype=np.object_)
        else:
            arrays[field.name] = np.array([value], dtype=field.numpy)
    if request.image is not None:  # in its own mode: converting to RGB first changes the frames
        arrays[IMAGE_FILE] = np.array([lossless_image_bytes(request.image)], dtype=np.object_)
    return arrays


# ------------------------------------------------------------------------------------- server side

def _one(name: str, array: np.ndarray) -> Any:
    if array.size != 1:
        raise InvalidRequestError(name, f"shape {list(array.shape)}", "a single value (shape [1])")
    return array.reshape(-1)[0]


def _text(name: str, value: Any) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequestError(name, value[:32], "UTF-8 text") from None
    return str(value)


def arrays_to_request(arrays: Mapping[str, np.ndarray], default_size: tuple[int, int]) -> GenerationRequest:
    """A request from the inputs a client sent (validate it with validate_request afterwards: it also
    bounds the image size)."""
    from PIL import Image

    if "PROMPT" not in arrays:
        raise InvalidRequestError("PROMPT", "missing", "a required input: the text description (BYTES [1])")
    values: dict[str, Any] = {"width": default_size[0], "height": default_size[1]}
    for field in SCALAR_FIELDS:
        if field.name not in arrays:
            continue
        value = _one(field.name, arrays[field.name])
        if field.wire_type == "BYTES":
            value = _text(field.name, value)
        elif field.wire_type == "FP64":
            value = float(value)
        else:
            value = int(value)
        values[field.attribute] = value
    if IMAGE in arrays and IMAGE_FILE in arrays:
        raise InvalidRequestError(IMAGE, "sent with IMAGE_FILE", "one image: IMAGE or IMAGE_FILE")
    if IMAGE_FILE in arrays:
        data = _one(IMAGE_FILE, arrays[IMAGE_FILE])
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidRequestError(IMAGE_FILE, type(data).__name__, "the bytes of an image file (BYTES [1])")
        try:
            values["image"] = load_image(bytes(data))  # size checked from the header, before decoding
        except ImageInputError as exc:
            raise InvalidRequestError(IMAGE_FILE, f"{len(data)} bytes", str(exc)) from None
    if IMAGE in arrays:
        pixels = arrays[IMAGE]
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            raise InvalidRequestError(IMAGE, f"{pixels.dtype} {list(pixels.shape)}", "uint8 RGB pixels [H, W, 3]")
        values["image"] = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    return GenerationRequest(**values)
