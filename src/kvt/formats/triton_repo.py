"""The Triton model repository kvt generates: model names, the record it carries, and the rules the
generator and the models running inside the server share.

``kvt triton-repo`` writes the repository; the orchestrator and the stage backend read it inside
tritonserver; the client addresses its models by these names. ``kvt_repository.json`` at the top records
what the repository was generated from and every file's size and SHA-256 (Triton ignores top-level
files); each model folder also carries what that model owns, so a model verifies itself alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvt.contract.errors import UserError
from kvt.contract.files import check_file_records, file_records, read_json_file, write_json_atomic
from kvt.contract.stages import StageSpec, parse_symbol

REPOSITORY_FILE = "kvt_repository.json"
MODEL_RECORD = "kvt_model.json"  # in a model's version folder: that model's own files (sizes, SHA-256)
VERSION = "1"  # the model version folder of every model (Triton serves the latest)
PIPELINE_FILE = "pipeline.json"  # the orchestrator's facts, in its version folder

TOKENIZER_MODEL = "text_tokenizer"
TEXT_ENCODING_MODEL = "text_encoding"
ORCHESTRATOR_MODEL = "kandinsky_video"
STREAM_MODEL = "kandinsky_video_stream"

TENSORRT, ONNXRUNTIME, PYTHON_ORT = "tensorrt", "onnxruntime", "python-ort"
BACKENDS = (TENSORRT, ONNXRUNTIME, PYTHON_ORT)


class RepositoryError(UserError):
    """The repository cannot be generated from these inputs, or a generated one is damaged."""


def batch_dim(spec: StageSpec) -> str | None:
    """The dimension Triton may batch over, if the stage allows it (same symbol first everywhere)."""
    if not spec.batch_independent:
        return None
    firsts = {t.shape[0] for t in spec.inputs + spec.outputs}
    first = next(iter(firsts), None)
    if len(firsts) != 1 or not isinstance(first, str):
        raise RepositoryError(f"stage {spec.name}: tensors do not share a first dimension ({sorted(map(str, firsts))})")
    scale, name = parse_symbol(first)
    if scale != 1:
        raise RepositoryError(f"stage {spec.name}: first dimension {name} is scaled; it cannot be a batch dim")
    return name


def max_batch_size(spec: StageSpec) -> int:
    name = batch_dim(spec)
    return 0 if name is None else max(p[name].max for p in spec.profiles)


def unsqueezed_inputs(spec: StageSpec, max_batch: int | None = None) -> list[str]:
    """Inputs that are per-row scalars [N] of a batched stage: on the wire they are [N, 1], and the
    config's ``reshape { shape: [] }`` gives the engine [N] again."""
    if not (max_batch_size(spec) if max_batch is None else max_batch):
        return []
    return [t.name for t in spec.inputs if len(t.shape) == 1]


def verify_repository(repo: str | Path, check_hashes: bool = False) -> dict[str, Any]:
    """Check a generated repository against the sizes (and hashes) ``kvt_repository.json`` records.

    The orchestrator runs this (sizes) when it loads, so a truncated plan, ONNX file or asset stops the
    server with the file's name rather than serving from a half-copied repository.
    """
    repo = Path(repo)
    path = repo / REPOSITORY_FILE
    try:
        record = json.loads(path.read_text())
        files = record["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RepositoryError(f"{path}: not a kvt repository record ({type(exc).__name__}: {exc})") from None
    check_file_records(repo, files, REPOSITORY_FILE, check_hashes, error=RepositoryError)
    return record


def write_model_record(folder: Path) -> Path:
    """Record the files of one model's version folder, so the model can verify what it owns alone:
    wherever Triton localises it (cloud storage copies each model to its own temporary folder), whatever
    the other models of the repository became (a swapped plan, a removed unused model)."""
    files = file_records(folder, lambda path: path.name != MODEL_RECORD)
    return write_json_atomic(folder / MODEL_RECORD, {"format": "kvt-triton-model", "version": 1, "files": files})


def verify_model_record(folder: str | Path, check_hashes: bool = False) -> None:
    """Check a model's own files against its record (sizes; hashes if asked)."""
    folder = Path(folder)
    record = read_json_file(folder / MODEL_RECORD, RepositoryError,
                            f"{folder / MODEL_RECORD}: missing; regenerate the repository with `kvt triton-repo`")
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        raise RepositoryError(f"{folder / MODEL_RECORD}: not a kvt model record")
    check_file_records(folder, record["files"], MODEL_RECORD, check_hashes, error=RepositoryError)
