"""The export directory and its manifest: the contract between ``kvt export`` and every consumer.

An export directory holds one ONNX model per stage plus what the pipeline needs beside the networks::

    manifest.json                   this file's format (below)
    <stage>.onnx [+ <stage>.onnx.data]   one per exported stage; external data for large models
    tokenizer/                      the T5 SentencePiece tokenizer (spiece.model)
    null_embeddings.safetensors     "t2v" and "interpolation" null embeddings, float32 [D]
    parity.json, parity.md          the parity report of this export

The manifest records, per stage, the file, its size and SHA-256, the compute precision and the I/O
contract it was exported with (copied from the stage table), plus the source weights' digest, the
opset and tool versions. Consumers (the ONNX Runtime backend, the TensorRT builder, the Triton
repository generator) read stage I/O from here or from the stage table it rebuilds, never elsewhere.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..models.atomic_io import write_json_atomic
from ..models.weight_files import sha256_file  # noqa: F401  (re-exported: export.source uses it)
from ..runtime.stages import ModelDims, ResolutionRange, StageSpec, StageTable, build_stage_table

FORMAT = "kvt-onnx-export"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"
NULL_EMBEDDINGS_FILE = "null_embeddings.safetensors"


class ExportManifestError(ValueError):
    """An export directory is missing, incomplete, corrupted or of another format."""




@dataclass
class TensorEntry:
    name: str
    dtype: str
    shape: list[int | str]


@dataclass
class StageEntry:
    stage: str
    file: str
    external_data: str | None
    compute_precision: str  # "fp32" or "fp16"
    inputs: list[TensorEntry]
    outputs: list[TensorEntry]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # file -> {"bytes", "sha256"}

    @classmethod
    def from_spec(cls, spec: StageSpec, file: str, external_data: str | None,
                  compute_precision: str) -> "StageEntry":
        def entries(tensors):
            return [TensorEntry(t.name, t.dtype.value, list(t.shape)) for t in tensors]

        return cls(spec.name, file, external_data, compute_precision, entries(spec.inputs), entries(spec.outputs))

    def record_files(self, directory: Path) -> None:
        """Sizes and SHA-256 of this stage's files as they are now in ``directory``."""
        names = [self.file] + ([self.external_data] if self.external_data else [])
        self.files = {n: {"bytes": (directory / n).stat().st_size, "sha256": sha256_file(directory / n)}
                      for n in names}


@dataclass
class ExportManifest:
    precision: str  # requested export precision: "fp32" or "fp16"
    opset: int
    model: dict[str, Any]  # tokens_length, context_dim, preset, resolution [min, opt, max]
    source: dict[str, Any]  # kind, path or preset/seed, digest
    tools: dict[str, str]
    stages: dict[str, StageEntry] = field(default_factory=dict)
    assets: dict[str, str] = field(default_factory=lambda: {"tokenizer": TOKENIZER_DIR,
                                                           "null_embeddings": NULL_EMBEDDINGS_FILE})
    options: dict[str, Any] = field(default_factory=dict)  # precision policy (e.g. fp16_movq)
    parity: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)  # per stage: node counts, seconds (not identity)
    created: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    # -------------------------------------------------------------- identity

    def identity(self) -> dict[str, Any]:
        """What makes two exports the same export (used to refuse mixing two in one directory)."""
        return {"precision": self.precision, "opset": self.opset, "source": self.source.get("digest"),
                "model": self.model, "options": self.options, "stages": sorted(self.stages)}

    def stage_table(self) -> StageTable:
        resolution = ResolutionRange(*self.model["resolution"])
        return build_stage_table(ModelDims(self.model["tokens_length"], self.model["context_dim"]), resolution)

    # -------------------------------------------------------------- I/O

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, directory: Path) -> Path:
        """Write ``manifest.json`` atomically (temporary name, then rename)."""
        return write_json_atomic(Path(directory) / MANIFEST_FILE, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "ExportManifest":
        if data.get("format") != FORMAT:
            raise ExportManifestError(f"{where}: not a kvt ONNX export (format {data.get('format')!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise ExportManifestError(f"{where}: export format version {data.get('format_version')} is not "
                                      f"supported (this kvt reads {FORMAT_VERSION}); re-export")
        try:
            stages = {
                name: StageEntry(**{**entry, "inputs": [TensorEntry(**t) for t in entry["inputs"]],
                                    "outputs": [TensorEntry(**t) for t in entry["outputs"]]})
                for name, entry in data["stages"].items()
            }
            fields = {k: v for k, v in data.items() if k != "stages"}
            return cls(**fields, stages=stages)
        except (KeyError, TypeError) as exc:
            raise ExportManifestError(f"{where}: malformed manifest ({exc})") from None

    @classmethod
    def read(cls, directory: str | Path) -> "ExportManifest":
        directory = Path(directory)
        path = directory / MANIFEST_FILE
        if not directory.is_dir():
            raise ExportManifestError(f"export directory {directory} does not exist")
        if not path.is_file():
            raise ExportManifestError(f"{directory}: no {MANIFEST_FILE}; not a complete kvt export "
                                      "(run `kvt export --out DIR`)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ExportManifestError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data, str(path))

    def verify_files(self, directory: str | Path, stages: list[str] | None = None,
                     check_hashes: bool = False) -> None:
        """Every file the manifest lists exists with its recorded size (and hash, if asked)."""
        directory = Path(directory)
        for name in stages or list(self.stages):
            if name not in self.stages:
                raise ExportManifestError(f"{directory}: stage {name!r} was not exported "
                                          f"(exported: {sorted(self.stages)})")
            for file, info in self.stages[name].files.items():
                path = directory / file
                if not path.is_file():
                    raise ExportManifestError(f"{path}: missing (listed in {MANIFEST_FILE})")
                if path.stat().st_size != info["bytes"]:
                    raise ExportManifestError(f"{path}: {path.stat().st_size} bytes, the manifest records "
                                              f"{info['bytes']}: truncated or replaced")
                if check_hashes and sha256_file(path) != info["sha256"]:
                    raise ExportManifestError(f"{path}: SHA-256 differs from the manifest: corrupted or replaced")
        for asset in self.assets.values():
            if not (directory / asset).exists():
                raise ExportManifestError(f"{directory / asset}: missing (listed in {MANIFEST_FILE})")
