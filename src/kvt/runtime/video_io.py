"""Writing videos: mp4 (H.264 through imageio-ffmpeg) and gif (Pillow), atomically.

A video is written under a temporary name in the target folder and renamed when complete, so an
interrupted or failed write never leaves a partial file under the requested name.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

from kvt.contract.errors import UserError
from kvt.contract.files import atomic_path

VIDEO_SUFFIXES = (".mp4", ".gif")
# The official README saves GIFs with duration 5500 / T ms per frame: clips last about 5.5 s.
CLIP_SECONDS = 5.5


class OutputPathError(UserError):
    """The output path cannot be written."""


def default_playback_fps(num_frames: int) -> float:
    return num_frames / CLIP_SECONDS


def check_output_path(path: str | Path) -> Path:
    """Fail before any work if ``path`` has an unsupported suffix or its folder is not writable."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise OutputPathError(f"output {str(path)!r}: unsupported suffix {path.suffix!r}; allowed: "
                              f"{list(VIDEO_SUFFIXES)}")
    if path.is_dir():
        raise OutputPathError(f"output {str(path)!r} is a directory; give a file name ending in .mp4 or .gif")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputPathError(f"output {str(path)!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"output {str(path)!r}: folder {str(parent)!r} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"output {str(path)!r} exists and is not writable")
    return path


def save_video(frames: npt.NDArray[np.uint8], path: str | Path, fps: float | None = None) -> Path:
    """Write uint8 frames [T, H, W, 3] to ``path`` (.mp4 or .gif) at ``fps`` (default: T / 5.5)."""
    import imageio

    path = check_output_path(path)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    fps = float(fps) if fps is not None else default_playback_fps(len(frames))
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".mp4":
            imageio.mimwrite(tmp, list(frames), fps=fps, format="FFMPEG", codec="libx264",
                             quality=8, pixelformat="yuv420p", macro_block_size=16)
        else:
            imageio.mimwrite(tmp, list(frames), format="GIF", duration=1000.0 / fps, loop=0)
    return path
