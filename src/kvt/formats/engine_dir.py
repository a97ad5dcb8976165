"""The engine directory and its manifest: the contract between ``kvt build`` and its consumers.

``kvt build --onnx EXPORT --out ENGINES`` writes::

    manifest.json                      this file's format (below)
    <stage>/<key>.plan                 one serialized TensorRT engine per stage and build key
    timing-<version>-<gpu>.cache       the builder's timing cache per TensorRT version and GPU model

A stage may have several plans (built for different GPUs or TensorRT versions); each entry records the
key it was built under, so a consumer picks the plan for its TensorRT version and its GPU (model name,
SM count, compute capability; a plan built with TensorRT's SAME_COMPUTE_CAPABILITY hardware
compatibility runs on every GPU of its compute capability) and never loads another: an H100 plan is
not an H200's, although both are compute capability 9.0. The Triton repository generator places these
plans (``model.plan``, or ``cc_model_filenames`` per compute capability); the TensorRT backend loads
them. Each entry records the plan's size, SHA-256 (computed once, while the plan is written) and a
fingerprint of its size, head and tail that a consumer checks cheaply on every load.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvt.contract.errors import UserError
from kvt.contract.files import read_json_file, write_json_atomic
from kvt.contract.stages import StageTable, StageTableError

FORMAT = "kvt-trt-engines"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
# BuildKey.device of a plan built with SAME_COMPUTE_CAPABILITY: it runs on any GPU of its compute capability.
ANY_DEVICE = "*"


def timing_cache_file(tensorrt_version: str, device: str) -> str:
    """The timing cache of one TensorRT version and GPU model (a cache of another is rejected by the
    builder, and would be overwritten by a build that starts empty)."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", device).strip("-") or "gpu"
    return f"timing-{tensorrt_version}-{slug}.cache"


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
    device: str = ""  # the GPU model the plan was built on (ANY_DEVICE: SAME_COMPUTE_CAPABILITY plans)
    sm_count: int = 0  # its streaming multiprocessors (0 with ANY_DEVICE)

    def runs_on(self, target: PlanTarget) -> bool:
        """Whether a plan of this key may run on ``target``: the same TensorRT version and compute
        capability, and the same GPU model and SM count unless built for any GPU of the capability."""
        if (self.tensorrt_version, self.compute_capability) != (target.tensorrt_version, target.compute_capability):
            return False
        return self.device == ANY_DEVICE or (self.device, self.sm_count) == (target.device, target.sm_count)

    def describe_target(self) -> str:
        gpu = (f"any GPU of compute capability {self.compute_capability}" if self.device == ANY_DEVICE
               else f"{self.device or 'an unrecorded GPU'} ({self.sm_count} SMs, compute capability "
                    f"{self.compute_capability})")
        return f"TensorRT {self.tensorrt_version} on {gpu}"

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildKey:
        profiles = tuple(tuple(tuple(dim) for dim in profile) for profile in data["profiles"])
        return cls(**{**data, "profiles": profiles})


@dataclass(frozen=True)
class PlanTarget:
    """The TensorRT version and GPU a consumer runs plans on."""

    tensorrt_version: str
    compute_capability: str
    device: str
    sm_count: int = 0

    def describe(self) -> str:
        return (f"TensorRT {self.tensorrt_version} on {self.device} ({self.sm_count} SMs, compute capability "
                f"{self.compute_capability})")


@dataclass
class PlanEntry:
    plan: str  # path relative to the engine directory
    key: BuildKey
    bytes: int
    sha256: str
    build_seconds: float | None = None
    fingerprint: str = ""  # SHA-256 of size, head and tail (see kvt.formats.engine_cache.plan_fingerprint)

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan, "key": asdict(self.key), "bytes": self.bytes, "sha256": self.sha256,
                "build_seconds": self.build_seconds, "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanEntry:
        return cls(data["plan"], BuildKey.from_dict(data["key"]), data["bytes"], data["sha256"],
                   data.get("build_seconds"), data.get("fingerprint", ""))


@dataclass
class EngineManifest:
    onnx_dir: str  # the export the plans were built from
    onnx_manifest: dict[str, Any]  # model dims, precision, resolution of that export (copied)
    stages: dict[str, list[PlanEntry]] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def plans_for(self, stage: str, target: PlanTarget) -> list[PlanEntry]:
        """Plans of ``stage`` that run on ``target``, plans for exactly its GPU model first."""
        plans = [p for p in self.stages.get(stage, []) if p.key.runs_on(target)]
        return sorted(plans, key=lambda p: p.key.device == ANY_DEVICE)

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
