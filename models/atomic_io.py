"""Directories that appear complete or not at all.

Writers assemble their output in a temporary directory beside the destination (same filesystem, so the
final rename is atomic) and put it in place only when everything is written; a failed or interrupted
write leaves at most a hidden temporary directory, never a destination that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path


def temporary_dir_beside(destination: Path) -> Path:
    """A new, empty hidden directory next to ``destination``."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.parent / f".{destination.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def replace_dir(tmp: Path, destination: Path) -> None:
    """Put ``tmp`` in place as ``destination``, replacing an existing directory there."""
    if destination.exists():
        old = destination.parent / f".{destination.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(destination, old)
        os.replace(tmp, destination)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, destination)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` under a hidden temporary name beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | Path, data: object, indent: int = 1) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=indent, default=str) + "\n")
