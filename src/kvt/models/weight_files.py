"""Weight files of a checkpoint directory in either form: the official pickles or safetensors.

Every network file of the official layout (``t2v.pt``, ``interpolation.pt``, ``movq.pt``,
``video_movq.pt``, ``t5_projections.pt``) may also be present as ``<stem>.safetensors`` (written by
``kvt convert-weights``), which holds no code at all. Safetensors is flat, so the official nesting is
flattened without renaming a single network key:

    t2v.safetensors / interpolation.safetensors   the U-Net's keys unchanged + ``null_embedding``
    movq.safetensors / video_movq.safetensors     the MoVQ's keys unchanged
    t5_projections.safetensors                    ``<head>.<key>`` for each projection head

Directories that kvt writes also carry ``kvt-weights.json``: every binary file's size and SHA-256, so a
truncated or replaced file is reported by name before anything is loaded (sizes always, hashes on
request: hashing a full-size directory reads ~40 GB).
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kvt.contract.errors import UserError
from kvt.contract.files import (
    FileRecordError,
    check_file_records,
    default_file_mode,
    file_records,
    write_json_atomic,
)

SAFETENSORS_SUFFIX = ".safetensors"
NULL_EMBEDDING_KEY = "null_embedding"
WEIGHTS_MANIFEST = "kvt-weights.json"
_MANIFEST_FORMAT = "kvt-weights"
_MANIFEST_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint file or folder is missing, unreadable, or does not match the architecture."""


class WeightFileError(CheckpointError, FileRecordError):
    """A weight file is missing, unreadable, truncated or of the wrong layout."""


def read_torch_file(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` (no arbitrary objects) and mmap; clear errors."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to unpickle: the file contains objects other than tensors and plain "
            f"containers ({str(exc).splitlines()[0]}). Only weight files are loaded."
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: unreadable or corrupted checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})"
        ) from None


def safetensors_name(pt_name: str) -> str:
    """``t2v.pt`` -> ``t2v.safetensors``."""
    return Path(pt_name).with_suffix(SAFETENSORS_SUFFIX).name


def weight_file(directory: Path, pt_name: str) -> Path | None:
    """The file holding ``pt_name``'s weights: the safetensors form if present, else the pickle."""
    for candidate in (directory / safetensors_name(pt_name), directory / pt_name):
        if candidate.is_file():
            return candidate
    return None


# ------------------------------------------------------------------------------------ flattening

def flatten(data: Mapping[str, Any], layout: str) -> dict[str, torch.Tensor]:
    """Official nested content -> one flat tensor dict (see the module docstring)."""
    if layout == "unet":
        flat = dict(data["unet"])
        if NULL_EMBEDDING_KEY in flat:
            raise WeightFileError(f"a U-Net key is named {NULL_EMBEDDING_KEY!r}: cannot flatten")
        flat[NULL_EMBEDDING_KEY] = data[NULL_EMBEDDING_KEY]
        return flat
    if layout == "heads":
        return {f"{head}.{key}": value for head, sd in data.items() for key, value in sd.items()}
    return dict(data)


def unflatten(flat: Mapping[str, torch.Tensor], layout: str, heads: tuple[str, ...] = ()) -> Any:
    """Inverse of :func:`flatten`: the structure the official ``torch.load`` would return."""
    if layout == "unet":
        unet = {k: v for k, v in flat.items() if k != NULL_EMBEDDING_KEY}
        out: dict[str, Any] = {"unet": unet}
        if NULL_EMBEDDING_KEY in flat:
            out[NULL_EMBEDDING_KEY] = flat[NULL_EMBEDDING_KEY]
        return out
    if layout == "heads":
        nested: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            head, _, rest = key.partition(".")
            if head not in heads or not rest:
                raise WeightFileError(f"key {key!r} does not start with one of the heads {list(heads)}")
            nested.setdefault(head, {})[rest] = value
        return nested
    return dict(flat)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a truncated or malformed file raises WeightFileError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightFileError(f"{path}: unreadable or corrupted safetensors file ({exc})") from None


def _unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory: give each its own contiguous copy only then."""
    seen: set[tuple[int, int | torch.SymInt]] = set()
    out = {}
    for key, value in tensors.items():
        value = value.detach().cpu()
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        shared = ident in seen or value.untyped_storage().nbytes() != value.nbytes
        seen.add(ident)
        out[key] = value.contiguous().clone() if shared or not value.is_contiguous() else value
    return out


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(_unshared(tensors), str(path), metadata={"format": "pt", "written_by": "kvt"})
    default_file_mode(path)  # safetensors writes 0600


# -------------------------------------------------------------------------------------- manifest

def write_weights_manifest(directory: Path) -> Path:
    """Record size and SHA-256 of every binary file under ``directory`` (written last, atomically).

    JSON files are left out: users edit configs.json (e.g. the text encoder path), and every JSON file
    is parsed and checked strictly when loaded anyway; weight and tokenizer files are binary and would
    otherwise fail late or, worse, load half.
    """
    files = file_records(directory, lambda path: path.suffix != ".json")
    return write_json_atomic(directory / WEIGHTS_MANIFEST,
                             {"format": _MANIFEST_FORMAT, "version": _MANIFEST_VERSION, "files": files})


def verify_weights_manifest(directory: Path, check_hashes: bool = False) -> bool:
    """Check the files ``kvt-weights.json`` lists; False when the directory has no manifest
    (official downloads have none: their pickles and safetensors headers are checked on reading)."""
    path = directory / WEIGHTS_MANIFEST
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
        files = data["files"] if data.get("format") == _MANIFEST_FORMAT else None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        files = None
    if not isinstance(files, dict):
        raise WeightFileError(f"{path}: not a {_MANIFEST_FORMAT} manifest (delete it or rewrite the directory)")
    check_file_records(directory, files, WEIGHTS_MANIFEST, check_hashes, error=WeightFileError)
    return True
