"""The engine cache: plans stored under their build key, reused when every part of the key matches.

A plan depends on the stage's ONNX file, the optimisation profiles, the compute precision of the graph,
the TensorRT version and the GPU (model name, SM count, compute capability; see
:class:`kvt.formats.engine_dir.BuildKey`). ``kvt build`` asks :meth:`EngineCache.lookup` first and builds
only on a miss; consumers ask :meth:`EngineCache.select` for the plan of *their* TensorRT version and GPU
and never get another one (a plan from another version or GPU fails to deserialize or, worse, runs
kernels tuned for another chip).

One plan per stage, TensorRT version and GPU is kept: storing a new one replaces the entry (and removes
the file) of an older build for the same GPU and version, so the directory always describes the last
build. Plans are written to a temporary name and renamed, streamed from TensorRT's buffer and hashed
on the way (no copy of a multi-GB plan in host memory); the manifest is rewritten atomically under a
file lock, so two builds into one directory cannot lose each other's entries. Loading maps the file and
checks its size and fingerprint (size, first and last MiB): a truncated or replaced plan is refused
without reading gigabytes; :meth:`EngineCache.verify` re-hashes the whole file on demand.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from kvt.contract.profiles import Profile, profile_key
from kvt.formats.engine_dir import (
    ANY_DEVICE,
    MANIFEST_FILE,
    BuildKey,
    EngineManifest,
    EngineManifestError,
    PlanEntry,
    PlanTarget,
    timing_cache_file,
)

PLAN_SUFFIX = ".plan"
LOCK_FILE = ".lock"
FINGERPRINT_BYTES = 1 << 20  # head and tail hashed on every load
_CHUNK = 64 << 20


class StalePlanError(EngineManifestError):
    """The directory has plans for a stage, but none for this TensorRT version and GPU."""


class PlanIntegrityError(EngineManifestError):
    """A plan file is missing, truncated or replaced (its size or SHA-256 differs from the manifest)."""


def onnx_digest(files: Mapping[str, Mapping[str, Any]]) -> str:
    """One SHA-256 over a stage's ONNX files as the export manifest records them (graph + external
    data): a change to either changes the key."""
    if not files:
        raise EngineManifestError("the export manifest records no files (and hashes) for this stage")
    joined = ";".join(f"{name}={info['sha256']}" for name, info in sorted(files.items()))
    return hashlib.sha256(joined.encode()).hexdigest()


def make_key(stage: str, onnx_sha256: str, profiles: Sequence[Profile], precision: str,
             tensorrt_version: str, compute_capability: str, optimization_level: int = 3,
             device: str = "", sm_count: int = 0) -> BuildKey:
    if not 0 <= optimization_level <= 5:
        raise ValueError(f"builder optimisation level {optimization_level}: allowed 0..5")
    if not profiles:
        raise ValueError(f"stage {stage}: at least one optimisation profile is needed")
    return BuildKey(stage=stage, onnx_sha256=onnx_sha256, profiles=profile_key(profiles),
                    precision=precision, tensorrt_version=tensorrt_version,
                    compute_capability=compute_capability, builder_optimization_level=optimization_level,
                    device=device, sm_count=0 if device == ANY_DEVICE else sm_count)


def _bytes_view(data: Any) -> memoryview:
    """A flat byte view of any buffer (bytes, memoryview, TensorRT's IHostMemory, an mmap): no copy."""
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def sha256_bytes(data: Any) -> str:
    """SHA-256 of a buffer, hashed in chunks (no copy)."""
    view, digest = _bytes_view(data), hashlib.sha256()
    for start in range(0, len(view), _CHUNK):
        digest.update(view[start:start + _CHUNK])
    return digest.hexdigest()


def plan_fingerprint(data: Any) -> str:
    """SHA-256 of the size, the first and the last :data:`FINGERPRINT_BYTES` of a plan: what a load checks
    (cheap at any size); the full SHA-256 is computed once, when the plan is written."""
    view = _bytes_view(data)
    digest = hashlib.sha256(str(len(view)).encode())
    digest.update(view[:FINGERPRINT_BYTES])
    digest.update(view[max(len(view) - FINGERPRINT_BYTES, 0):])
    return digest.hexdigest()


def write_atomic(path: Path, data: Any) -> None:
    """Write ``data`` (any buffer) to a hidden temporary file beside ``path``, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive advisory lock on the directory (POSIX; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def same_export(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether two export summaries describe the same networks: model dims, precision policy and the
    weights (``source_digest``): plans of one checkpoint never sit beside plans of another."""
    keys = ("model", "precision", "options", "source_digest")
    return all(recorded.get(k) == current.get(k) for k in keys)


class EngineCache:
    """An engine directory: its manifest, plans and timing cache."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    # -------------------------------------------------------------- manifest

    def exists(self) -> bool:
        return (self.directory / MANIFEST_FILE).is_file()

    def manifest(self) -> EngineManifest:
        return EngineManifest.read(self.directory)

    def open_for(self, onnx_dir: str, onnx_summary: dict[str, Any], overwrite: bool = False) -> EngineManifest:
        """The manifest to build into: the existing one when it describes the same export, else a new
        one. Plans of another model in the same directory are an error unless ``overwrite``."""
        with _locked(self.directory):
            if self.exists():
                manifest = self.manifest()
                if same_export(manifest.onnx_manifest, onnx_summary):
                    manifest.onnx_dir, manifest.onnx_manifest = onnx_dir, dict(onnx_summary)
                    manifest.write(self.directory)
                    return manifest
                if not overwrite:
                    raise EngineManifestError(
                        f"{self.directory}: holds plans of another export (model "
                        f"{manifest.onnx_manifest.get('model')}, precision "
                        f"{manifest.onnx_manifest.get('precision')}, weights "
                        f"{str(manifest.onnx_manifest.get('source_digest'))[:12]}) than {onnx_dir} (model "
                        f"{onnx_summary.get('model')}, precision {onnx_summary.get('precision')}, weights "
                        f"{str(onnx_summary.get('source_digest'))[:12]}); choose another --out or pass --overwrite")
            manifest = EngineManifest(onnx_dir=onnx_dir, onnx_manifest=dict(onnx_summary))
            manifest.write(self.directory)
            return manifest

    # -------------------------------------------------------------- plans

    def plan_path(self, entry: PlanEntry) -> Path:
        return self.directory / entry.plan

    def lookup(self, key: BuildKey, verify_hash: bool = False) -> PlanEntry | None:
        """The stored plan built under exactly ``key`` whose file is intact, else None."""
        if not self.exists():
            return None
        for entry in self.manifest().stages.get(key.stage, []):
            if entry.key != key:
                continue
            try:
                self.check_file(entry, verify_hash)
            except PlanIntegrityError:
                return None
            return entry
        return None

    def check_file(self, entry: PlanEntry, verify_hash: bool = True) -> None:
        path = self.plan_path(entry)
        if not path.is_file():
            raise PlanIntegrityError(f"{path}: missing (listed in {self.directory / MANIFEST_FILE})")
        size = path.stat().st_size
        if size != entry.bytes:
            raise PlanIntegrityError(f"{path}: {size} bytes, the manifest records {entry.bytes}: truncated "
                                     "or replaced; rebuild with `kvt build`")
        if verify_hash and sha256_bytes(path.read_bytes()) != entry.sha256:
            raise PlanIntegrityError(f"{path}: SHA-256 differs from the manifest: corrupted or replaced; "
                                     "rebuild with `kvt build`")

    @contextlib.contextmanager
    def open_plan(self, entry: PlanEntry) -> Iterator[memoryview]:
        """The plan's bytes as a read-only view of the mapped file (no copy in host memory), checked
        against the recorded size and fingerprint; the full SHA-256 for entries written before
        fingerprints were recorded."""
        path = self.plan_path(entry)
        self.check_file(entry, verify_hash=False)
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                ok = (plan_fingerprint(view) == entry.fingerprint if entry.fingerprint
                      else sha256_bytes(view) == entry.sha256)
                if not ok:
                    raise PlanIntegrityError(f"{path}: content differs from the manifest (fingerprint/SHA-256): "
                                             "corrupted or replaced; rebuild with `kvt build`")
                yield view
            finally:
                view.release()

    def read_plan(self, entry: PlanEntry) -> bytes:
        """The plan's bytes (a copy), checked as :meth:`open_plan` checks them."""
        with self.open_plan(entry) as view:
            return bytes(view)

    def verify(self, entry: PlanEntry) -> None:
        """The whole file against the recorded SHA-256 (reads every byte)."""
        self.check_file(entry, verify_hash=True)

    def store(self, key: BuildKey, plan: Any, build_seconds: float | None = None) -> PlanEntry:
        """Write the plan (any buffer: TensorRT's IHostMemory, bytes) atomically, hashing it on the way,
        and record it, replacing an older plan of the same stage, TensorRT version and GPU (whose file
        is removed)."""
        if not self.exists():
            raise EngineManifestError(f"{self.directory}: no {MANIFEST_FILE}; call open_for() first")
        relative = f"{key.stage}/{key.digest()}{PLAN_SUFFIX}"
        data = _bytes_view(plan)
        entry = PlanEntry(plan=relative, key=key, bytes=len(data), sha256=sha256_bytes(data),
                          build_seconds=None if build_seconds is None else round(build_seconds, 3),
                          fingerprint=plan_fingerprint(data))
        write_atomic(self.directory / relative, data)
        with _locked(self.directory):
            manifest = self.manifest()
            kept: list[PlanEntry] = []
            dropped: list[PlanEntry] = []
            for old in manifest.stages.get(key.stage, []):
                same_target = ((old.key.tensorrt_version, old.key.compute_capability, old.key.device,
                                old.key.sm_count) == (key.tensorrt_version, key.compute_capability,
                                                      key.device, key.sm_count))
                (dropped if same_target else kept).append(old)
            manifest.stages[key.stage] = kept + [entry]
            manifest.write(self.directory)
        for old in dropped:
            if old.plan != relative:
                with contextlib.suppress(FileNotFoundError):
                    (self.directory / old.plan).unlink()
        return entry

    def select(self, stage: str, target: PlanTarget, manifest: EngineManifest | None = None) -> PlanEntry:
        """The plan of ``stage`` for this TensorRT version and GPU; never one built for another."""
        manifest = manifest or self.manifest()
        plans = manifest.plans_for(stage, target)
        if plans:
            return plans[0]
        others = manifest.stages.get(stage, [])
        if not others:
            raise EngineManifestError(
                f"{self.directory}: no plan for stage {stage!r} (built: {sorted(manifest.stages)}); "
                f"run `kvt build --onnx {manifest.onnx_dir} --out {self.directory}`")
        built_for = "; ".join(sorted({p.key.describe_target() for p in others}))
        raise StalePlanError(
            f"{self.directory}: the plan of stage {stage!r} was built for {built_for}; this machine has "
            f"{target.describe()}. A plan only runs with the TensorRT version and the GPU model it was built "
            f"for: rebuild it here with `kvt build --onnx {manifest.onnx_dir} --out {self.directory}`")

    # -------------------------------------------------------------- timing cache

    def timing_cache_path(self, tensorrt_version: str, device: str) -> Path:
        """The default timing cache of a TensorRT version and GPU model in this directory."""
        return self.directory / timing_cache_file(tensorrt_version, device)

    @staticmethod
    def load_timing_cache(path: Path) -> bytes:
        return path.read_bytes() if path.is_file() else b""

    @staticmethod
    def save_timing_cache(data: Any, path: Path) -> Path:
        write_atomic(path, _bytes_view(data))
        return path
