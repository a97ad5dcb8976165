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

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvt.contract.errors import UserError
from kvt.contract.files import check_file_records, file_records, read_json_file, write_json_atomic
from kvt.contract.stages import StageSpec, StageTable, StageTableError

FORMAT = "kvt-onnx-export"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"
NULL_EMBEDDINGS_FILE = "null_embeddings.safetensors"
# Initializers named "network.<parameter>" are the network's weights (graph inputs while the exporter
# cleans a graph, initializers in the export); every other initializer is a folded constant.
WEIGHT_PREFIX = "network."


class ExportManifestError(UserError):
    """An export directory is missing, incomplete, corrupted or of another format."""




# Keys of ``model`` that record the architecture (configs.json form, T5 config keywords) for `kvt build`.
ARCHITECTURE_KEYS = ("configs", "t5")


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
                  compute_precision: str) -> StageEntry:
        def entries(tensors):
            return [TensorEntry(t.name, t.dtype.value, list(t.shape)) for t in tensors]

        return cls(spec.name, file, external_data, compute_precision, entries(spec.inputs), entries(spec.outputs))

    def record_files(self, directory: Path) -> None:
        """Sizes and SHA-256 of this stage's files as they are now in ``directory``."""
        names = {self.file} | ({self.external_data} if self.external_data else set())
        self.files = file_records(directory, lambda path: path.relative_to(directory).as_posix() in names)


@dataclass
class ExportManifest:
    precision: str  # requested export precision: "fp32" or "fp16"
    opset: int
    model: dict[str, Any]  # tokens_length, context_dim, preset, resolution [min, opt, max], configs, t5
    source: dict[str, Any]  # kind, path or preset/seed, digest
    tools: dict[str, str]
    stages: dict[str, StageEntry] = field(default_factory=dict)
    assets: dict[str, str] = field(default_factory=lambda: ExportManifest.default_assets())
    options: dict[str, Any] = field(default_factory=dict)  # precision policy (e.g. fp16_movq)
    parity: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)  # per stage: node counts, seconds (not identity)
    created: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    # -------------------------------------------------------------- identity

    def identity(self) -> dict[str, Any]:
        """What makes two exports the same export (used to refuse mixing two in one directory)."""
        # The recorded architecture (model.configs / model.t5) follows from the source's files, which the
        # digest covers; leaving it out keeps exports made before it was recorded reusable.
        model = {k: v for k, v in self.model.items() if k not in ARCHITECTURE_KEYS}
        return {"precision": self.precision, "opset": self.opset, "source": self.source.get("digest"),
                "model": model, "options": self.options, "stages": sorted(self.stages)}

    def stage_table(self) -> StageTable:
        try:
            return StageTable.from_summary(self.model, f"export manifest {MANIFEST_FILE}")
        except StageTableError as exc:
            raise ExportManifestError(str(exc)) from None

    @staticmethod
    def default_assets() -> dict[str, str]:
        return {"tokenizer": TOKENIZER_DIR, "null_embeddings": NULL_EMBEDDINGS_FILE}

    # -------------------------------------------------------------- I/O

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, directory: Path) -> Path:
        """Write ``manifest.json`` atomically (temporary name, then rename)."""
        return write_json_atomic(Path(directory) / MANIFEST_FILE, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> ExportManifest:
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
    def read(cls, directory: str | Path) -> ExportManifest:
        directory = Path(directory)
        path = directory / MANIFEST_FILE
        if not directory.is_dir():
            raise ExportManifestError(f"export directory {directory} does not exist")
        data = read_json_file(path, ExportManifestError, f"{directory}: no {MANIFEST_FILE}; not a complete kvt "
                                                         "export (run `kvt export --out DIR`)")
        if not isinstance(data, dict):
            raise ExportManifestError(f"{path}: not a kvt ONNX export manifest")
        return cls.from_dict(data, str(path))

    def verify_files(self, directory: str | Path, stages: list[str] | None = None,
                     check_hashes: bool = False) -> None:
        """Every file the manifest lists exists with its recorded size (and hash, if asked)."""
        directory = Path(directory)
        for name in stages or list(self.stages):
            if name not in self.stages:
                raise ExportManifestError(f"{directory}: stage {name!r} was not exported "
                                          f"(exported: {sorted(self.stages)})")
            check_file_records(directory, self.stages[name].files, MANIFEST_FILE, check_hashes,
                               error=ExportManifestError)
        for asset in self.assets.values():
            if not (directory / asset).exists():
                raise ExportManifestError(f"{directory / asset}: missing (listed in {MANIFEST_FILE})")
