"""The engine directory and its manifest: the contract between ``kvt build`` and its consumers.

``kvt build --onnx EXPORT --out ENGINES`` writes::

    manifest.json                      this file's format (below)
    <stage>/<key>.plan                 one serialized TensorRT engine per stage and build key
    timing.cache                       the builder's timing cache (loaded and saved by every build)

A stage may have several plans (built for different GPUs or TensorRT versions); each entry records the
key it was built under, so a consumer picks the plan for its GPU's compute capability and its TensorRT
version and never loads another. The Triton repository generator places these plans
(``model.plan``, or ``cc_model_filenames`` per compute capability); the TensorRT backend loads them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvt.contract.errors import UserError
from kvt.contract.files import read_json_file, write_json_atomic
from kvt.contract.stages import StageTable, StageTableError

FORMAT = "kvt-trt-engines"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TIMING_CACHE_FILE = "timing.cache"


class EngineManifestError(UserError):
    """An engine directory is missing, incomplete or of another format."""


@dataclass(frozen=True)
class BuildKey:
    """Everything a plan depends on; a plan is reused only when every field matches."""

    stage: str
    onnx_sha256: str  # of the stage's .onnx file (the export manifest records it)
    profiles: tuple[tuple[tuple[str, int, int, int], ...], ...]  # per profile: (dim, min, opt, max)
    precision: str  # the ONNX graph's compute precision ("fp16" graphs build strongly typed)
    tensorrt_version: str
    compute_capability: str  # e.g. "9.0"
    builder_optimization_level: int = 3

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildKey:
        profiles = tuple(tuple(tuple(dim) for dim in profile) for profile in data["profiles"])
        return cls(**{**data, "profiles": profiles})


@dataclass
class PlanEntry:
    plan: str  # path relative to the engine directory
    key: BuildKey
    bytes: int
    sha256: str
    build_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan, "key": asdict(self.key), "bytes": self.bytes, "sha256": self.sha256,
                "build_seconds": self.build_seconds}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanEntry:
        return cls(data["plan"], BuildKey.from_dict(data["key"]), data["bytes"], data["sha256"],
                   data.get("build_seconds"))


@dataclass
class EngineManifest:
    onnx_dir: str  # the export the plans were built from
    onnx_manifest: dict[str, Any]  # model dims, precision, resolution of that export (copied)
    stages: dict[str, list[PlanEntry]] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def plans_for(self, stage: str, tensorrt_version: str, compute_capability: str) -> list[PlanEntry]:
        """Plans of ``stage`` built for exactly this TensorRT version and GPU."""
        return [p for p in self.stages.get(stage, [])
                if p.key.tensorrt_version == tensorrt_version and p.key.compute_capability == compute_capability]

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "format_version": self.format_version, "onnx_dir": self.onnx_dir,
                "onnx_manifest": self.onnx_manifest,
                "stages": {s: [p.to_dict() for p in plans] for s, plans in self.stages.items()}}

    def write(self, directory: str | Path) -> Path:
        return write_json_atomic(Path(directory) / MANIFEST_FILE, self.to_dict())

    @classmethod
    def read(cls, directory: str | Path) -> EngineManifest:
        directory = Path(directory)
        path = directory / MANIFEST_FILE
        data = read_json_file(path, EngineManifestError, f"{directory}: no {MANIFEST_FILE}; not a kvt engine "
                                                         "directory (run `kvt build --onnx EXPORT --out DIR`)")
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise EngineManifestError(f"{path}: not a kvt engine manifest of version {FORMAT_VERSION}")
        try:
            stages = {s: [PlanEntry.from_dict(p) for p in plans] for s, plans in data["stages"].items()}
            return cls(data["onnx_dir"], data["onnx_manifest"], stages)
        except (KeyError, TypeError) as exc:
            raise EngineManifestError(f"{path}: malformed manifest ({exc})") from None


def stage_table_of(manifest: EngineManifest, where: Path) -> StageTable:
    """The stage table of the export the plans were built from."""
    try:
        return StageTable.from_summary(manifest.onnx_manifest.get("model") or {}, str(where / MANIFEST_FILE))
    except StageTableError as exc:
        raise EngineManifestError(f"{exc}; rebuild with `kvt build`") from None
