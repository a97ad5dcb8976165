"""ONNX -> TensorRT plans, one per stage, through the engine cache.

Networks are built STRONGLY TYPED: every tensor keeps the type the ONNX graph gives it, so the FP16
U-Nets of an fp16 export run in FP16 with the FP32 islands the exporter kept (norms, softmax,
embeddings), and the FP32 T5 / MoVQs stay FP32. This is the only mode TensorRT 11 has (it removed the
FP16 builder flag and the other weak-typing switches) and TensorRT 10 supports it, as NVIDIA's
demo/Diffusion builds its engines. No precision flag is ever set.

Per stage: parse the ONNX file (parser errors are reported with node index, name and operator),
check the network's inputs and outputs against the stage table, add one optimisation profile per
profile of :mod:`kvt.contract.profiles`, set the optimisation level, the workspace limit and the shared
timing cache (loaded before, saved after every plan), build, and store the plan in the cache.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from kvt.contract.dtypes import DType
from kvt.contract.errors import KvtError, UserError
from kvt.contract.files import replace_dir, temporary_dir_beside
from kvt.contract.files import write_bytes_atomic as write_atomic
from kvt.contract.profiles import Profile, Resolution, describe_profiles, input_shapes, select_profiles
from kvt.contract.stages import StageSpec
from kvt.formats.engine_cache import EngineCache, make_key, onnx_digest
from kvt.formats.engine_dir import PlanEntry
from kvt.formats.export_dir import ExportManifest, ExportManifestError
from kvt.runtime.backends.tensorrt.trt_env import (
    GpuInfo,
    TensorRTUnavailable,
    import_tensorrt,
    make_logger,
    require_gpu,
    tensorrt_version,
)

log = logging.getLogger(__name__)

Report = Callable[[str], None]


class OnnxParseError(KvtError, RuntimeError):
    """TensorRT's ONNX parser rejected a graph (the message lists the failing nodes)."""


class EngineBuildError(KvtError, RuntimeError):
    """TensorRT could not build a plan (unsupported layer, out of memory, ...)."""


@dataclass(frozen=True)
class BuildOptions:
    optimization_level: int = 3  # TensorRT's builder_optimization_level, 0..5 (3 = TensorRT's default)
    workspace_bytes: int | None = None  # MemoryPoolType.WORKSPACE limit; None: TensorRT's (device memory)
    timing_cache: Path | None = None  # default: <engine dir>/timing.cache
    force: bool = False  # rebuild even when a valid plan with the same key exists
    overwrite: bool = False  # allow replacing plans of another export in the output directory
    verbose: bool = False  # TensorRT's INFO messages

    def __post_init__(self) -> None:
        if not 0 <= self.optimization_level <= 5:
            raise UserError(f"optimisation level {self.optimization_level}: allowed 0..5")
        if self.workspace_bytes is not None and self.workspace_bytes <= 0:
            raise UserError(f"workspace {self.workspace_bytes} bytes: must be positive")


@dataclass
class StageResult:
    stage: str
    entry: PlanEntry
    reused: bool
    seconds: float


@dataclass
class BuildResult:
    directory: Path
    tensorrt_version: str
    gpu: GpuInfo
    stages: list[StageResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # stages no requested mode calls


# ------------------------------------------------------------------------------------ TensorRT side

def trt_dtype(trt: ModuleType, dtype: DType) -> Any:
    """The TensorRT DataType of a contract dtype."""
    return getattr(trt.DataType, dtype.tensorrt)


def strongly_typed_flags(trt: ModuleType) -> int:
    """Network creation flags: STRONGLY_TYPED (TensorRT 10); 11.x is strongly typed always and may drop
    the flag, in which case none is needed."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def parse_onnx(trt: ModuleType, parser: Any, path: Path) -> None:
    """Parse ``path`` (external data is found beside it); failures name every failing node."""
    if parser.parse_from_file(str(path)):
        return
    problems = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        node = error.node()
        where = (f"node {node} {error.node_name()!r} ({error.node_operator()})" if node >= 0
                 else "the graph")
        problems.append(f"{where}: {error.desc()} [{error.code()}]")
    detail = "; ".join(problems) if problems else "no error was reported by the parser"
    raise OnnxParseError(f"{path}: TensorRT {tensorrt_version(trt)}'s ONNX parser failed: {detail}")


def check_network_io(trt: ModuleType, network: Any, spec: StageSpec, path: Path) -> None:
    """The parsed network's inputs and outputs are the stage's, with the contract's dtypes and ranks."""
    for kind, count, get, contract in (
        ("inputs", network.num_inputs, network.get_input, spec.inputs),
        ("outputs", network.num_outputs, network.get_output, spec.outputs),
    ):
        tensors = {t.name: t for t in (get(i) for i in range(count))}
        wanted = [t.name for t in contract]
        if sorted(tensors) != sorted(wanted):
            raise OnnxParseError(f"{path}: the network's {kind} are {sorted(tensors)}, stage "
                                 f"{spec.name!r} needs {wanted}: a stale or foreign ONNX file?")
        for tensor_spec in contract:
            tensor = tensors[tensor_spec.name]
            if tensor.dtype != trt_dtype(trt, tensor_spec.dtype):
                raise OnnxParseError(f"{path}: {kind[:-1]} {tensor_spec.name!r} is {tensor.dtype} in the "
                                     f"network, the contract says {tensor_spec.dtype.value}")
            if len(tensor.shape) != len(tensor_spec.shape):
                raise OnnxParseError(f"{path}: {kind[:-1]} {tensor_spec.name!r} has rank {len(tensor.shape)}, "
                                     f"the contract says {list(tensor_spec.shape)}")


@dataclass
class BuiltPlan:
    plan: bytes
    timing_cache: bytes
    seconds: float


class PlanMaker(Protocol):
    """Turns one stage's ONNX graph and profiles into a plan. :class:`TensorRTPlanMaker` builds real
    TensorRT plans; ``kvt rehearse`` passes one that writes stand-in plans (the same profiles, no GPU),
    so everything around the build (profile selection, build keys, the cache, the manifest) is the same
    code for both."""

    @property
    def version(self) -> str:
        """Recorded as the build key's TensorRT version."""

    @property
    def gpu(self) -> GpuInfo:
        """The device the plans are for."""

    def make(self, onnx_path: Path, spec: StageSpec, profiles: Sequence[Profile], options: BuildOptions,
             timing_cache: bytes) -> BuiltPlan:
        """One plan of ``spec`` with one optimisation profile per entry of ``profiles``."""


class TensorRTPlanMaker:
    """Real plans, built with the TensorRT library ``trt`` for ``gpu``."""

    def __init__(self, trt: ModuleType, gpu: GpuInfo) -> None:
        self.trt = trt
        self._gpu = gpu

    @property
    def version(self) -> str:
        return tensorrt_version(self.trt)

    @property
    def gpu(self) -> GpuInfo:
        return self._gpu

    def make(self, onnx_path: Path, spec: StageSpec, profiles: Sequence[Profile], options: BuildOptions,
             timing_cache: bytes) -> BuiltPlan:
        return build_plan(self.trt, onnx_path, spec, profiles, options, timing_cache)


def build_plan(trt: ModuleType, onnx_path: Path, spec: StageSpec, profiles: Sequence[Profile],
               options: BuildOptions, timing_cache: bytes = b"") -> BuiltPlan:
    """One serialized plan of ``spec`` from ``onnx_path``: strongly typed, one profile per entry."""
    start = time.perf_counter()
    logger = make_logger(trt, options.verbose)
    builder = trt.Builder(logger)
    network = builder.create_network(strongly_typed_flags(trt))
    parser = trt.OnnxParser(network, logger)
    parse_onnx(trt, parser, onnx_path)
    check_network_io(trt, network, spec, onnx_path)

    config = builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    cache = config.create_timing_cache(timing_cache)
    if not config.set_timing_cache(cache, False):
        log.warning("the timing cache does not fit this TensorRT/GPU: starting an empty one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in input_shapes(spec, profile).items():
            trt_profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(trt_profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errors = "; ".join(logger.errors[-5:]) or "see TensorRT's log (run with --verbose)"
        raise EngineBuildError(f"{onnx_path}: TensorRT could not build stage {spec.name!r} with profiles "
                               f"{describe_profiles(profiles)}: {errors}")
    plan = bytes(memoryview(serialized))
    new_cache = bytes(memoryview(config.get_timing_cache().serialize()))
    return BuiltPlan(plan, new_cache, time.perf_counter() - start)


# ------------------------------------------------------------------------------------ the build

def export_summary(manifest: ExportManifest) -> dict[str, Any]:
    """What the engine manifest keeps of the export: enough to rebuild the stage table and find the
    assets (copied next to the plans under the same names)."""
    return {"precision": manifest.precision, "opset": manifest.opset, "model": manifest.model,
            "options": manifest.options, "source_digest": manifest.source.get("digest"),
            "assets": dict(manifest.assets),
            "compute_precision": {name: entry.compute_precision for name, entry in manifest.stages.items()}}


def copy_assets(export_dir: Path, assets: dict[str, str], out_dir: Path) -> None:
    """Tokenizer and null embeddings beside the plans, so an engine directory is self-contained."""
    for name in assets.values():
        source, target = export_dir / name, out_dir / name
        if source.is_dir():
            tmp = temporary_dir_beside(target)
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            replace_dir(tmp, target)
        elif source.is_file():
            write_atomic(target, source.read_bytes())
        else:
            raise ExportManifestError(f"{source}: missing (listed in the export manifest's assets)")


def build_engines(
    onnx_dir: str | Path,
    out_dir: str | Path,
    resolutions: Sequence[Resolution] = (),
    fps_modes: Sequence[str] = (),
    stages: Sequence[str] | None = None,
    options: BuildOptions = BuildOptions(),
    report: Report = print,
    *,
    table_batch: bool = False,
    trt: ModuleType | None = None,
    gpu: GpuInfo | None = None,
    maker: PlanMaker | None = None,
) -> BuildResult:
    """Build (or reuse) one plan per stage into ``out_dir``.

    Everything cheap is checked first (export manifest and files, profiles), then TensorRT and the GPU,
    before any TensorRT object exists. ``trt`` and ``gpu`` are for tests (a fake library); by default
    the real ones are found. ``maker`` replaces TensorRT altogether (stand-in plans of ``kvt rehearse``).
    """
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    export = ExportManifest.read(onnx_dir)
    table = export.stage_table()
    names = list(stages) if stages is not None else list(export.stages)
    missing = [n for n in names if n not in export.stages]
    if missing:
        raise ExportManifestError(f"{onnx_dir}: stages {missing} were not exported (exported: "
                                  f"{sorted(export.stages)})")
    export.verify_files(onnx_dir, names)
    plan_profiles = select_profiles(table, resolutions, fps_modes, names, table_batch=table_batch)

    if maker is None:
        maker = TensorRTPlanMaker(trt if trt is not None else import_tensorrt(),
                                  gpu if gpu is not None else require_gpu())
    version, gpu = maker.version, maker.gpu

    cache = EngineCache(out_dir)
    cache.open_for(str(onnx_dir.resolve()), export_summary(export), overwrite=options.overwrite)
    copy_assets(onnx_dir, export.assets, out_dir)
    timing_path = options.timing_cache or cache.timing_cache_path
    timing = cache.load_timing_cache(timing_path)
    result = BuildResult(out_dir, version, gpu, skipped=[n for n in names if n not in plan_profiles])
    for name in result.skipped:
        report(f"{name}: skipped (no requested fps mode calls it)")
    for name in names:
        if name not in plan_profiles:
            continue
        entry = export.stages[name]
        profiles = plan_profiles[name]
        key = make_key(name, onnx_digest(entry.files), profiles, entry.compute_precision, version,
                       gpu.compute_capability, options.optimization_level)
        found = None if options.force else cache.lookup(key)
        if found is not None:
            report(f"{name}: reusing {out_dir / found.plan} (same ONNX, profiles, precision, TensorRT "
                   f"{version}, compute capability {gpu.compute_capability})")
            result.stages.append(StageResult(name, found, True, 0.0))
            continue
        report(f"{name}: building ({entry.compute_precision} graph, strongly typed; profiles "
               f"{describe_profiles(profiles)}) for {gpu}")
        built = maker.make(onnx_dir / entry.file, table[name], profiles, options, timing)
        stored = cache.store(key, built.plan, built.seconds)
        if built.timing_cache:
            timing = built.timing_cache
            cache.save_timing_cache(timing, timing_path)
        report(f"{name}: built {out_dir / stored.plan} ({stored.bytes / 2**20:.1f} MiB) in {built.seconds:.1f} s")
        result.stages.append(StageResult(name, stored, False, built.seconds))
    return result


__all__ = ["BuildOptions", "BuildResult", "EngineBuildError", "OnnxParseError", "PlanMaker", "StageResult",
           "TensorRTPlanMaker", "TensorRTUnavailable", "build_engines", "build_plan", "export_summary"]
