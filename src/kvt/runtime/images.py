"""Pixel conversions the official pipeline performs around the MoVQs (docs/spec/quirks.md, quirks 16 and 30).

The key frame is part of the model's behaviour as a uint8 PIL image: decoded, clipped, x255 and
truncated, resized with Pillow's default filter, centre-cropped (Pillow rounds the float box), converted
to RGB and mapped back to [-1, 1]. A torch resize is not equivalent, so Pillow does it here too.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image, UnidentifiedImageError

from kvt.contract.errors import UserError
from kvt.contract.request import MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE


class ImageInputError(UserError):
    """An input image cannot be read or is unsuitable."""


# Formats a conditioning image file may have (Pillow plugins outside this list are never tried).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


def to_uint8_tensor(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] decoder output -> [N, H, W, 3] uint8 on the same device: clip((x + 1) / 2) x 255,
    truncated (quirk 30)."""
    pixels = torch.clip((images.float() + 1.0) / 2.0, 0.0, 1.0).mul(255.0)
    return pixels.to(torch.uint8).permute(0, 2, 3, 1)


def to_uint8(images: torch.Tensor) -> npt.NDArray[np.uint8]:
    """:func:`to_uint8_tensor`, copied to the host as numpy."""
    return to_uint8_tensor(images).cpu().numpy()


def psnr_db(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of two uint8 images of the same shape (inf when identical)."""
    mse = float(((candidate.double() - reference.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def key_frame_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """The official preprocessing of a conditioning image of any mode: the RGB width x height image the
    MoVQ encoder sees (official ``encode_image``, t2v_pipeline.py; quirk 16).

    In the image's own mode: downscale (never up) by max(1, min(w / width, h / height)) to the rounded
    size with Pillow's default filter (bicubic; Pillow resizes RGBA / LA with premultiplied alpha, so
    colour under transparent pixels does not bleed in, and palette / bilevel images with nearest),
    centre-crop to exactly width x height (Pillow rounds the float box; where the image is smaller the
    crop pads with zeros of its mode), and only then convert to RGB (zeros become black, white for
    CMYK, palette entry 0 for palette images). Converting to RGB first gives other pixels for RGBA, LA,
    P and CMYK images, so a server must receive the image in its own mode, losslessly, and call this.
    """
    image = image.resize(resized_size(image.size, width, height))
    old_width, old_height = image.size
    box = ((old_width - width) / 2, (old_height - height) / 2,
           (old_width + width) / 2, (old_height + height) / 2)
    image = image.crop(box)
    return image if image.mode == "RGB" else image.convert("RGB")


def key_frame_pixels(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """The MoVQ encoder input for ``image`` (any mode): [1, 3, height, width] float32 in [-1, 1], from
    :func:`key_frame_image` (ToTensor, then 2x - 1, as the official ``image_transform``)."""
    rgb = key_frame_image(image, width, height)
    array = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return (2.0 * array.to(torch.float32).div(255) - 1.0).unsqueeze(0)


def resized_size(size: tuple[int, int], width: int, height: int) -> tuple[int, int]:
    """The size an image of ``size`` (w, h) is resized to before the centre crop to width x height."""
    reduce_factor = max(1.0, min(size[0] / width, size[1] / height))
    return round(size[0] / reduce_factor), round(size[1] / reduce_factor)


def describe_key_frame_fit(size: tuple[int, int], width: int, height: int) -> str | None:
    """What :func:`key_frame_pixels` does to an image of ``size`` (w, h), in words; None if nothing.

    The official pipeline resizes and crops a conditioning image without a word; a user should know
    that a 768x512 photo became a 64x64 centre crop.
    """
    w, h = size
    if (w, h) == (width, height):
        return None
    rw, rh = resized_size(size, width, height)
    steps = [] if (rw, rh) == (w, h) else [f"resized to {rw}x{rh}"]
    crop, pad = rw > width or rh > height, rw < width or rh < height
    if crop or pad:
        how = " and ".join(word for word, done in (("centre-cropped", crop), ("padded with black", pad)) if done)
        steps.append(f"{how} to {width}x{height}")
    return f"input image {w}x{h} " + " and ".join(steps)


def load_image(source: str | Path | bytes | Image.Image) -> Image.Image:
    """A fully decoded PIL image, in the mode the file stores, from a path, the bytes of an image file
    (e.g. a PNG a client sent losslessly) or an image; unreadable data raises ImageInputError."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(source)), f"image data ({len(source)} bytes)")
    path = Path(source)
    if not path.is_file():
        raise ImageInputError(f"image {str(path)!r} does not exist or is not a file")
    return _decode(path, f"image {str(path)!r}")


# Modes PNG stores losslessly (Pillow writes "I" as 16 bits, so it goes to TIFF with CMYK, YCbCr and F).
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")


def lossless_image_bytes(image: Image.Image) -> bytes:
    """``image`` as the bytes of an image file that :func:`load_image` decodes to the same mode, size,
    pixels and palette: PNG where PNG holds the mode, TIFF otherwise (CMYK, YCbCr, I, F). A client sends
    these so that the server does the official preprocessing in the image's own mode."""
    buffer = io.BytesIO()
    if image.mode in _PNG_MODES:
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="TIFF")
    return buffer.getvalue()


def _decode(source: Path | io.BytesIO, what: str) -> Image.Image:
    try:
        with Image.open(source, formats=IMAGE_FORMATS) as opened:
            _check_pixels(opened.size, what)  # from the header, before decoding
            opened.load()
            return opened.copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageInputError(f"{what} cannot be read as an image of the formats "
                              f"{list(IMAGE_FORMATS)} ({exc})") from None


def _check_pixels(size: tuple[int, int], what: str) -> None:
    w, h = size
    if w > MAX_IMAGE_SIDE or h > MAX_IMAGE_SIDE or w * h > MAX_IMAGE_PIXELS:
        raise ImageInputError(f"{what} is {w}x{h} pixels: at most {MAX_IMAGE_SIDE} per side and "
                              f"{MAX_IMAGE_PIXELS} in all are accepted")


def image_from_array(array: npt.NDArray[Any] | torch.Tensor) -> Image.Image:
    """An image sent as a tensor (Triton, Python callers): uint8 [H, W, 3], [H, W, 4] or [H, W].

    Floats are refused rather than guessed at ([0, 1] or [0, 255]?); the shape and size are checked
    before any copy.
    """
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    if not isinstance(array, np.ndarray):
        raise ImageInputError(f"image: {type(array).__name__} given, a uint8 array [H, W, 3] is expected")
    if array.dtype != np.uint8:
        raise ImageInputError(f"image: dtype {array.dtype}, expected uint8 [H, W, 3] (RGB, 0-255)")
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageInputError(f"image: shape {list(array.shape)}, expected [H, W, 3], [H, W, 4] or [H, W]")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageInputError(f"image: shape {list(array.shape)} is empty")
    _check_pixels((array.shape[1], array.shape[0]), "image")
    return Image.fromarray(np.ascontiguousarray(array))
