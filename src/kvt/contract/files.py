"""Files and directories that appear complete or not at all, and the records that prove it.

Every writer in kvt goes through :func:`atomic_path` (files) or :func:`temporary_dir_beside` +
:func:`replace_dir` (directories): the output is assembled under a hidden temporary name beside the
destination (same filesystem, so the rename is atomic), flushed to disk, and renamed into place only when
complete. A failed or interrupted write leaves at most a hidden temporary, never a destination that looks
complete. :func:`file_records` / :func:`check_file_records` are the size-and-SHA-256 records that export,
engine, weights and Triton repository manifests carry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from kvt.contract.errors import UserError


class FileRecordError(UserError):
    """A file a manifest records is missing, truncated or replaced."""


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); on success fsync it and rename it over
    ``path``; on any error remove it. ``mode``: permission bits of the result (default: the umask's)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        _fsync_file(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (os.umask sets it, which is
    racy with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def default_file_mode(*paths: Path) -> None:
    """Give files the permissions the umask grants a new file (0644 under umask 022).

    Some writers (safetensors, and transformers through it) create files 0600, as a temporary file
    would be: a server container or pod running as another user could not read the weights."""
    umask = _umask()
    for path in paths:
        os.chmod(path, 0o666 & ~umask)


def write_bytes_atomic(path: str | Path, data: bytes | memoryview) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | Path, data: object, indent: int = 1) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=indent, default=str) + "\n")


def temporary_dir_beside(destination: Path) -> Path:
    """A new, empty hidden directory next to ``destination``."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.parent / f".{destination.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def replace_dir(tmp: Path, destination: Path) -> None:
    """Put ``tmp`` in place as ``destination``, replacing an existing directory there."""
    for file in tmp.rglob("*"):
        if file.is_file() and not file.is_symlink():
            _fsync_file(file)
    if destination.exists():
        old = destination.parent / f".{destination.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(destination, old)
        os.replace(tmp, destination)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, destination)
    _fsync_dir(destination.parent)


# ------------------------------------------------------------------------------------------ hashing

def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def file_records(directory: Path, include: Callable[[Path], bool] = lambda path: True) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes", "sha256"}}`` for the files under ``directory`` that ``include`` takes."""
    return {path.relative_to(directory).as_posix(): {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
            for path in sorted(p for p in directory.rglob("*") if p.is_file() and include(p))}


def check_file_records(directory: Path, files: Mapping[str, Mapping[str, Any]], listed_in: str,
                       check_hashes: bool = False,
                       error: Callable[[str], Exception] = FileRecordError) -> None:
    """Every recorded file exists with its size (and hash); else ``error`` naming the file."""
    for name, info in files.items():
        file = directory / name
        if not file.is_file():
            raise error(f"{file}: missing (listed in {listed_in})")
        size = file.stat().st_size
        if size != info["bytes"]:
            raise error(f"{file}: {size} bytes, {listed_in} records {info['bytes']}: truncated or replaced")
        if check_hashes and sha256_file(file) != info["sha256"]:
            raise error(f"{file}: SHA-256 differs from {listed_in}: corrupted or replaced")


def read_json_file(path: Path, error: Callable[[str], Exception], missing: str) -> Any:
    """The JSON content of ``path``; ``error(missing)`` when there is no such file, ``error`` naming the
    file when it is not valid JSON."""
    if not path.is_file():
        raise error(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
