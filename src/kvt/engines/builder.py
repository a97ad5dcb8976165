"""ONNX -> TensorRT plans, one per stage, through the engine cache.

Networks are built STRONGLY TYPED: every tensor keeps the type the ONNX graph gives it, so the FP16
U-Nets of an fp16 export run in FP16 with the FP32 islands the exporter kept (norms, embeddings), the
MoVQs stay FP32, and the text encoder is BF16 (its exported FP32 graph is rewritten with BF16 GEMM and
embedding weights, :mod:`kvt.engines.precision`; ``--text-encoder-precision fp32`` keeps it FP32).
Strong typing is the only mode TensorRT 11 has (it removed the FP16 builder flag and the other
weak-typing switches; the STRONGLY_TYPED creation flag is still bound there, value 0 and ignored) and
TensorRT 10 has it complete from 10.12 on. No precision flag is ever set. TensorRT's TF32 builder flag
is on by default: FP32 convolutions and GEMMs (MoVQs) may run in TF32.

Before any TensorRT object exists: the export's files, the profiles, TensorRT and the GPU, the static
checks of the graphs (:mod:`kvt.engines.static_checks`: support matrix and build-time constants must
pass; attention that cannot fuse is reported) and the memory plan (:mod:`kvt.engines.memory_plan`: a set
of plans that cannot fit the GPU is refused).

Per stage: parse the ONNX file (parser errors are reported with node index, name and operator),
check the network's inputs and outputs against the stage table, add one optimisation profile per
profile of :mod:`kvt.contract.profiles`, set the optimisation level, the workspace limit, the
RUNTIME_ACTIVATION_RESIZE preview feature (activation memory sized by the shapes in use at run time),
optionally SAME_COMPUTE_CAPABILITY hardware compatibility, and the timing cache of this TensorRT
version and GPU (loaded before, saved after every plan), build, and stream the plan into the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from kvt.contract.dtypes import DType
from kvt.contract.errors import KvtError, UserError
from kvt.contract.files import replace_dir, temporary_dir_beside
from kvt.contract.files import write_bytes_atomic as write_atomic
from kvt.contract.profiles import Profile, Resolution, describe_profiles, input_shapes, select_profiles
from kvt.contract.stages import StageSpec, StageTable
from kvt.engines import memory_plan
from kvt.engines.precision import rewrite_bf16_weights
from kvt.engines.static_checks import GraphReport, check_export, require_clean
from kvt.formats.engine_cache import EngineCache, make_key, onnx_digest
from kvt.formats.engine_dir import ANY_DEVICE, PlanEntry
from kvt.formats.export_dir import ExportManifest, ExportManifestError
from kvt.models.registry import network_spec
from kvt.runtime.backends.tensorrt.trt_env import (
    GpuInfo,
    TensorRTUnavailable,
    check_tensorrt_version,
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


TEXT_ENCODER_PRECISIONS = ("bf16", "fp32")


@dataclass(frozen=True)
class BuildOptions:
    optimization_level: int = 3  # TensorRT's builder_optimization_level, 0..5 (3 = TensorRT's default)
    # MemoryPoolType.WORKSPACE limit (tactic scratch, part of a context's activation memory, so the memory
    # plan counts it); None: TensorRT's default, the whole device memory (the plan then cannot bound it).
    workspace_bytes: int | None = memory_plan.DEFAULT_WORKSPACE_BYTES
    timing_cache: Path | None = None  # default: <engine dir>/timing-<TensorRT version>-<GPU>.cache
    force: bool = False  # rebuild even when a valid plan with the same key exists
    overwrite: bool = False  # allow replacing plans of another export in the output directory
    verbose: bool = False  # TensorRT's INFO messages
    text_encoder_precision: str = "bf16"  # "fp32": the exported FP32 graph as it is (about 35 GB full size)
    same_compute_capability: bool = False  # plans for every GPU of the build GPU's compute capability
    memory_check: bool = True  # refuse a set of plans the memory plan says cannot fit the GPU
    static_checks: bool = True  # refuse graphs outside the support matrix or with computed constants
    detailed_profiling: bool = False  # ProfilingVerbosity.DETAILED: the engine inspector shows layer details

    def __post_init__(self) -> None:
        if not 0 <= self.optimization_level <= 5:
            raise UserError(f"optimisation level {self.optimization_level}: allowed 0..5")
        if self.workspace_bytes is not None and self.workspace_bytes <= 0:
            raise UserError(f"workspace {self.workspace_bytes} bytes: must be positive")
        if self.text_encoder_precision not in TEXT_ENCODER_PRECISIONS:
            raise UserError(f"text encoder precision {self.text_encoder_precision!r}: allowed "
                            f"{list(TEXT_ENCODER_PRECISIONS)}")


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
    memory: memory_plan.MemoryPlan | None = None  # the plan checked before building (None: not checked)
    checks: dict[str, GraphReport] = field(default_factory=dict)  # static checks of the built graphs


# ------------------------------------------------------------------------------------ TensorRT side

def trt_dtype(trt: ModuleType, dtype: DType) -> Any:
    """The TensorRT DataType of a contract dtype."""
    return getattr(trt.DataType, dtype.tensorrt)


def strongly_typed_flags(trt: ModuleType) -> int:
    """Network creation flags: STRONGLY_TYPED (value 1 in TensorRT 10, so 1 << 1). TensorRT 11 is
    strongly typed always; it keeps the enum value (0) for API compatibility and ignores it
    (NvInfer.h 11.1), so the same expression works there."""
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
    plan: bytes | memoryview  # any buffer; TensorRT's IHostMemory is passed through as a memoryview (no copy)
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
        check_tensorrt_version(trt)
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


def set_timing_cache(config: Any, data: bytes) -> None:
    """Load ``data`` into the builder config's timing cache, or an empty cache when TensorRT rejects it
    (another version or GPU, or corrupt: ``create_timing_cache`` may then return None, as Polygraphy
    guards, and ``set_timing_cache`` returns False on a mismatch)."""
    cache = config.create_timing_cache(data) if data else None
    if cache is None or not config.set_timing_cache(cache, False):
        if data:
            log.warning("the timing cache does not fit this TensorRT/GPU (or is damaged): starting an empty one")
        cache = config.create_timing_cache(b"")
        if cache is None or not config.set_timing_cache(cache, False):
            raise EngineBuildError("TensorRT could not create an empty timing cache")


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
    # update_device_memory_size_for_shapes may then size activations for the shapes in use (10.10+).
    resize = getattr(trt.PreviewFeature, "RUNTIME_ACTIVATION_RESIZE_10_10", None)
    if resize is not None:
        config.set_preview_feature(resize, True)
    if options.same_compute_capability:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY
    if options.detailed_profiling:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    set_timing_cache(config, timing_cache)
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in input_shapes(spec, profile).items():
            trt_profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(trt_profile)

    mark = len(logger.errors)  # errors logged before (a rejected timing cache) are not this build's
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errors = "; ".join(logger.errors[mark:][-5:]) or "see TensorRT's log (run with --verbose)"
        raise EngineBuildError(f"{onnx_path}: TensorRT could not build stage {spec.name!r} with profiles "
                               f"{describe_profiles(profiles)}: {errors}")
    new_cache = bytes(memoryview(config.get_timing_cache().serialize()))
    return BuiltPlan(memoryview(serialized), new_cache, time.perf_counter() - start)


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


def is_text_encoder(spec: StageSpec) -> bool:
    return network_spec(spec.network).family == "text_encoder"


def plan_precision(spec: StageSpec, exported: str, options: BuildOptions) -> str:
    """The precision of the plan of ``spec``: the graph's, except the FP32 text encoder built as BF16."""
    if is_text_encoder(spec) and exported == "fp32" and options.text_encoder_precision == "bf16":
        return "bf16"
    return exported


def check_graphs(onnx_dir: Path, names: Sequence[str], report: Report) -> dict[str, GraphReport]:
    """Support matrix and build-time constants must pass (TensorRT would refuse or mis-build the graph);
    attention outside the fusable form is reported (the memory plan counts its score matrices)."""
    reports = check_export(onnx_dir, names, checks=("support", "constants"))
    require_clean(reports)
    for name, graph in reports.items():
        unfused = [site for site in graph.attention if not site.fusable_form]
        if unfused:
            report(f"{name}: {len(unfused)} attention site(s) TensorRT cannot fuse (first: "
                   f"{unfused[0].describe()}); re-export with this kvt version")
    return reports


def check_memory(export: ExportManifest, table: StageTable, plan_profiles: Mapping[str, Sequence[Profile]],
                 precisions: Mapping[str, str], checks: Mapping[str, GraphReport], gpu: GpuInfo,
                 options: BuildOptions, report: Report) -> memory_plan.MemoryPlan | None:
    """The memory plan of this build on ``gpu``; refuses a set whose plans cannot fit it."""
    preset = export.model.get("preset")
    if gpu.total_memory <= 0:
        report(f"memory plan skipped: the memory of {gpu.name} is unknown (`kvt plan-memory --gpu` computes it)")
        return None
    try:
        if "configs" in export.model and "t5" in export.model:  # the export's own architecture
            request = memory_plan.architecture_request(export.model["configs"], export.model["t5"], precisions,
                                                       f"export manifest model.configs ({preset})")
        else:  # exports made before the manifest recorded it
            request = memory_plan.preset_request(str(preset), [], [], precisions=precisions)
    except (UserError, ValueError):
        report(f"memory plan skipped: the export records neither its architecture nor a known preset ({preset!r})")
        return None
    unfused = {}
    for name, graph in checks.items():
        dtypes = {memory_plan.onnx_to_torch_dtype(site.dtype) for site in graph.attention
                  if not site.fused_kernel_expected}
        unfused[name] = frozenset(d for d in dtypes if d is not None)
    request = dataclasses.replace(
        request, table=table, profiles=dict(plan_profiles),
        workspace_bytes=options.workspace_bytes or 0, unfused_dtypes=unfused if checks else None)
    target = memory_plan.GpuSpec(gpu.name, gpu.total_memory)
    plan = memory_plan.Planner.shared().plan(request, target, f"{preset} build")
    if options.workspace_bytes is None:
        plan.notes.append("the builder workspace is unlimited (no --workspace): not counted")
    totals = plan.tensorrt_totals()
    report(f"memory plan (computed, not measured): {totals.total / 2**30:.1f} GiB of {gpu.total_memory / 2**30:.1f} "
           f"GiB for the TensorRT backend ({plan.spare('tensorrt') * 100:.0f} % spare; weights "
           f"{totals.weights / 2**30:.1f}, activations {totals.activations / 2**30:.1f} GiB)")
    # Triton holds activation memory per model: reported, not refused (the plans serve both backends).
    triton = plan.triton_totals()
    report(f"memory plan for Triton (activations per model, {plan.strategy}): {triton.total / 2**30:.1f} GiB "
           f"({plan.spare('triton') * 100:.0f} % spare)"
           + ("" if plan.fits("triton", memory_plan.DEFAULT_MIN_SPARE) else
              f"; warning: under {memory_plan.DEFAULT_MIN_SPARE * 100:.0f} % free under Triton on this GPU "
              "(see `kvt plan-memory` and docs/TENSORRT.md)"))
    if options.memory_check:
        memory_plan.require_fit(plan, ["tensorrt"], 0.0)
        if not plan.fits("tensorrt", memory_plan.DEFAULT_MIN_SPARE):
            report(f"warning: less than {memory_plan.DEFAULT_MIN_SPARE * 100:.0f} % of the GPU stays free")
    return plan


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

    Everything is checked before any TensorRT object exists: export manifest and files, profiles, then
    TensorRT and the GPU (a machine without them stops here, at once), the graphs' static checks and
    the memory plan. ``trt`` and
    ``gpu`` are for tests (a fake library); by default the real ones are found. ``maker`` replaces
    TensorRT altogether (stand-in plans of ``kvt rehearse``).
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
    precisions = {name: plan_precision(table[name], export.stages[name].compute_precision, options)
                  for name in plan_profiles}

    if maker is None:  # finds TensorRT and the GPU; no TensorRT object exists before the first make()
        maker = TensorRTPlanMaker(trt if trt is not None else import_tensorrt(),
                                  gpu if gpu is not None else require_gpu())
    version, gpu = maker.version, maker.gpu
    checks = check_graphs(onnx_dir, list(plan_profiles), report) if options.static_checks else {}
    if "bf16" in precisions.values() and _capability(gpu) < (8, 0):
        raise UserError(f"{gpu}: BF16 plans need compute capability 8.0 or newer; build the text encoder "
                        "with --text-encoder-precision fp32")
    planned = check_memory(export, table, plan_profiles, precisions, checks, gpu, options, report)
    device = ANY_DEVICE if options.same_compute_capability else gpu.name

    cache = EngineCache(out_dir)
    cache.open_for(str(onnx_dir.resolve()), export_summary(export), overwrite=options.overwrite)
    copy_assets(onnx_dir, export.assets, out_dir)
    timing_path = options.timing_cache or cache.timing_cache_path(version, device if device != ANY_DEVICE
                                                                  else f"sm{gpu.compute_capability}")
    timing = cache.load_timing_cache(timing_path)
    result = BuildResult(out_dir, version, gpu, skipped=[n for n in names if n not in plan_profiles],
                         memory=planned, checks=checks)
    for name in result.skipped:
        report(f"{name}: skipped (no requested fps mode calls it)")
    target = (f"any GPU of compute capability {gpu.compute_capability}" if device == ANY_DEVICE
              else f"{gpu.name} ({gpu.sm_count} SMs)")
    for name in names:
        if name not in plan_profiles:
            continue
        entry = export.stages[name]
        profiles = plan_profiles[name]
        precision = precisions[name]
        key = make_key(name, onnx_digest(entry.files), profiles, precision, version, gpu.compute_capability,
                       options.optimization_level, device, gpu.sm_count)
        found = None if options.force else cache.lookup(key)
        if found is not None:
            report(f"{name}: reusing {out_dir / found.plan} (same ONNX, profiles, precision, TensorRT "
                   f"{version}, {target})")
            result.stages.append(StageResult(name, found, True, 0.0))
            continue
        report(f"{name}: building ({precision} plan of the {entry.compute_precision} graph, strongly typed; "
               f"profiles {describe_profiles(profiles)}) for {gpu}")
        with _graph_for(onnx_dir / entry.file, precision != entry.compute_precision, out_dir, name, report) as graph:
            built = maker.make(graph, table[name], profiles, options, timing)
        stored = cache.store(key, built.plan, built.seconds)
        if built.timing_cache:
            timing = built.timing_cache
            cache.save_timing_cache(timing, timing_path)
        report(f"{name}: built {out_dir / stored.plan} ({stored.bytes / 2**20:.1f} MiB) in {built.seconds:.1f} s")
        result.stages.append(StageResult(name, stored, False, built.seconds))
    return result


def _capability(gpu: GpuInfo) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in gpu.compute_capability.split("."))
    except ValueError:
        return (0,)


@contextlib.contextmanager
def _graph_for(path: Path, bf16: bool, out_dir: Path, stage: str, report: Report) -> Iterator[Path]:
    """``path`` itself, or (``bf16``) a BF16-weight rewrite of it in a temporary folder of ``out_dir``
    that is removed after the build."""
    if not bf16:
        yield path
        return
    folder = out_dir / f".{stage}.bf16-{uuid.uuid4().hex[:8]}"
    try:
        rewritten = rewrite_bf16_weights(path, folder / path.name)
        report(f"{stage}: {rewritten.converted} GEMM/embedding weights as BF16 "
               f"({rewritten.bytes_before / 1e9:.2f} -> {rewritten.bytes_after / 1e9:.2f} GB)")
        yield rewritten.path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


__all__ = ["BuildOptions", "BuildResult", "EngineBuildError", "OnnxParseError", "PlanMaker", "StageResult",
           "TensorRTPlanMaker", "TensorRTUnavailable", "build_engines", "build_plan", "export_summary"]
