"""The memory planner: will a set of TensorRT plans fit one GPU? Computed from the networks on the meta
device, never measured (nothing here needs a GPU or TensorRT).

Per stage and optimisation profile it counts

* **weights**: the parameters the stage's call actually uses (module hooks on the meta-device network:
  the image-mode U-Net plan has no temporal layers), at the plan's precision (FP16 U-Nets, FP32 MoVQs,
  the text encoder's GEMM and embedding weights in BF16 unless ``fp32``; TensorRT plans own their
  weights, so two plans of one network hold two copies);
* **activations**, a bound for the profile's largest shapes: the high-water mark of the live
  intermediate tensors of one eager call (every op's output kept exactly as long as something still
  uses it; inputs, outputs and weights excluded), plus the builder's workspace limit (TensorRT's scratch
  for a layer's tactic comes out of the same activation memory), plus, where the attention lint of
  :mod:`kvt.engines.static_checks` cannot rule it out, the unfused attention worst case: the largest
  score matrix of the stage, twice (scores and probabilities), in the attention's dtype. Attention in
  the fusable form at FP16/BF16 is counted as a fused kernel (no score matrix). The bound assumes
  TensorRT keeps no more intermediates alive at once than the eager call (its fusions usually keep
  fewer); it has not been compared with a real plan's ``device_memory_size_v2``;
* **I/O**: the stage's input and output tensors at the largest shapes (the runtime's buffers).

Totals, against the GPU's memory as NVML reports it:

* **TensorRT backend** (one process): every plan's weights + one activation buffer shared by all engines
  (the largest stage's bound; the engines run one after another) + every stage's I/O + one CUDA context;
* **Triton** (TensorRT backend of tritonserver): every plan's weights + activations per model instance
  and per execution context: Triton's TensorRT backend creates one context per optimisation profile the
  instance lists, each allocating, with its default ``STATIC`` strategy, the plan's largest activation
  memory over all profiles (``ON_PROFILE_CHANGE``: that profile's) + I/O + two CUDA contexts
  (tritonserver, and the orchestrator's python-backend process).

``kvt plan-memory`` prints it and exits non-zero when a set does not fit; ``kvt build`` runs it before
building and refuses a set that cannot fit the GPU it builds for.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kvt.contract.errors import UserError
from kvt.contract.profiles import Profile, Resolution, select_profiles
from kvt.contract.stages import StageSpec, StageTable
from kvt.models.configs import KandinskyVideoConfig
from kvt.models.presets import get_preset
from kvt.models.registry import build_network, network_spec
from kvt.models.stage_modules import stage_module, stage_table_for

GIB = 2**30
MIB = 2**20

# Per process: CUDA context, cuBLAS/cuDNN/TensorRT kernels and their handles (an assumption, not a
# measurement; a CUDA context alone is several hundred MiB on Hopper).
CUDA_CONTEXT_BYTES = 1 * GIB
TRITON_PROCESSES = 2  # tritonserver, and the python-backend stub running the orchestrator on the GPU
DEFAULT_WORKSPACE_BYTES = 512 * MIB  # kvt build's default builder workspace limit (--workspace)
DEFAULT_MIN_SPARE = 0.10  # kvt plan-memory: a set "fits" with at least this fraction of the GPU free

PRECISIONS = ("fp32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
ALLOCATION_STRATEGIES = ("STATIC", "ON_PROFILE_CHANGE")


class MemoryPlanError(UserError):
    """A set of plans does not fit the GPU (the message carries the breakdown)."""


# ------------------------------------------------------------------------------------- GPUs

@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory: int  # bytes, as NVML (nvidia-smi) reports the total

    def __str__(self) -> str:
        return f"{self.name} ({self.memory / GIB:.1f} GiB)"


# Totals as NVML reports them (nvidia-smi "MiB"), collected in https://thundergolfer.com/blog/nvidia-gpu-memory-capacity.
KNOWN_GPUS: dict[str, GpuSpec] = {
    "H100-80GB": GpuSpec("H100 80GB", 81559 * MIB),
    "H200": GpuSpec("H200 141GB", 143771 * MIB),
    "A100-80GB": GpuSpec("A100 80GB", 81920 * MIB),
    "A100-40GB": GpuSpec("A100 40GB", 40960 * MIB),
    "L40S": GpuSpec("L40S 48GB", 46068 * MIB),
}
_ALIASES = {"H100": "H100-80GB", "H100-80G": "H100-80GB", "H200-141GB": "H200", "A100": "A100-80GB"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GIB|GB|MIB|MB|B)?\s*$", re.IGNORECASE)


def parse_gpu(text: str) -> GpuSpec:
    """A known GPU name (``H100-80GB``, ``H200``, ...) or a memory size (``80GiB``, ``85520809984``)."""
    key = text.strip().upper()
    key = _ALIASES.get(key, key)
    if key in KNOWN_GPUS:
        return KNOWN_GPUS[key]
    match = _SIZE.match(text)
    if match:
        unit = (match.group(2) or "B").upper()
        scale = {"GIB": GIB, "GB": 10**9, "MIB": MIB, "MB": 10**6, "B": 1}[unit]
        return GpuSpec(f"{text.strip()} GPU", int(float(match.group(1)) * scale))
    raise UserError(f"--gpu {text!r}: a GPU name ({', '.join(KNOWN_GPUS)}) or a memory size such as 80GiB")


# ------------------------------------------------------------------------------------- the meta trace

@dataclass(frozen=True)
class AttentionCall:
    """One scaled-dot-product attention of a traced call."""

    batch: int
    heads: int
    queries: int
    keys: int
    dtype: torch.dtype

    def score_bytes(self) -> int:
        """Scores and probabilities, both materialised, as an unfused attention keeps them."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.batch * self.heads * self.queries * self.keys * element


@dataclass(frozen=True)
class CallTrace:
    """What one stage call at given dims needs."""

    stage: str
    dims: Mapping[str, int]
    live_peak: int  # high-water mark of live intermediates (attention as a fused kernel)
    io_bytes: int
    attention: tuple[AttentionCall, ...]
    used_parameters: tuple[str, ...]  # qualified names of the parameters the call reads


class _LiveMemory(TorchDispatchMode):
    """High-water mark of the storages that ops create, each freed when its last tensor dies."""

    def __init__(self, excluded: set[int]) -> None:
        super().__init__()
        self.excluded = excluded
        self.sizes: dict[int, int] = {}
        self.refs: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.excluded:
            return
        if key not in self.sizes:
            self.sizes[key] = storage.nbytes()
            self.current += self.sizes[key]
            self.peak = max(self.peak, self.current)
        self.refs[key] = self.refs.get(key, 0) + 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.current -= self.sizes.pop(key)


class _FusedAttention(TorchFunctionMode):
    """Records every scaled_dot_product_attention and returns its output without a score matrix (a
    fused kernel's memory); the unfused worst case is added from the records.

    Also answers ``bool()`` of a meta tensor with True: transformers' T5 asks whether its padding mask
    is all ones (to skip building the mask), which the meta device cannot say; building it or not
    changes nothing the plan counts."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[AttentionCall] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query, key, value = args[:3]
            batch = int(torch.tensor(query.shape[:-2]).prod()) if query.dim() > 2 else 1
            heads = 1
            if query.dim() == 4:
                batch, heads = int(query.shape[0]), int(query.shape[1])
            self.calls.append(AttentionCall(batch, heads, int(query.shape[-2]), int(key.shape[-2]), query.dtype))
            return torch.empty((*query.shape[:-1], value.shape[-1]), dtype=query.dtype, device=query.device)
        if func is torch.Tensor.__bool__ and args and args[0].is_meta:
            return True
        return func(*args, **kwargs)


def _used_parameters(module: nn.Module) -> tuple[contextlib.AbstractContextManager[None], list[nn.Module]]:
    called: list[nn.Module] = []
    handles = []
    for sub in module.modules():
        if any(True for _ in sub.parameters(recurse=False)) or any(True for _ in sub.buffers(recurse=False)):
            handles.append(sub.register_forward_pre_hook(lambda m, _args: called.append(m)))

    @contextlib.contextmanager
    def scope() -> Iterator[None]:
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    return scope(), called


def trace_call(module: nn.Module, spec: StageSpec, dims: Mapping[str, int]) -> CallTrace:
    """Trace ``module`` (a stage module on the meta device) at ``dims``: live memory, I/O, attention,
    used parameters."""
    inputs = {name: value.to("meta") for name, value in spec.sample_inputs(dict(dims)).items()}
    excluded = {t.untyped_storage()._cdata for t in list(module.parameters()) + list(module.buffers())}
    excluded |= {t.untyped_storage()._cdata for t in inputs.values()}
    io = sum(t.numel() * t.element_size() for t in inputs.values())
    names = {id(m): n for n, m in module.named_modules()}
    scope, called = _used_parameters(module)
    live = _LiveMemory(excluded)
    attention = _FusedAttention()
    with scope, torch.inference_mode(), attention, live:
        outputs = module(*(inputs[name] for name in spec.input_names))
    outs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    io += sum(t.numel() * t.element_size() for t in outs)
    used = []
    for sub in dict.fromkeys(called):  # first-call order, once each
        prefix = names.get(id(sub), "")
        used += [f"{prefix}.{n}" if prefix else n for n, _ in sub.named_parameters(recurse=False)]
        used += [f"{prefix}.{n}" if prefix else n for n, _ in sub.named_buffers(recurse=False)]
    return CallTrace(spec.name, dict(dims), live.peak, io, tuple(attention.calls), tuple(used))


# ------------------------------------------------------------------------------------- plans

@dataclass(frozen=True)
class ProfileMemory:
    """Bytes one execution context needs for one optimisation profile (at its largest shapes)."""

    dims: Mapping[str, int]  # the profile's max dims
    live_bytes: int
    workspace_bytes: int
    attention_bytes: int  # the unfused attention worst case, counted (0: fused kernels expected)
    attention_worst: int  # the unfused attention worst case, whether counted or not
    io_bytes: int

    @property
    def activation_bytes(self) -> int:
        return self.live_bytes + self.workspace_bytes + self.attention_bytes


@dataclass(frozen=True)
class StagePlan:
    stage: str
    precision: str
    weight_bytes: int
    profiles: tuple[ProfileMemory, ...]
    attention: str  # how attention was counted, in words

    @property
    def activation_bytes(self) -> int:
        """The plan's largest activation memory over its profiles (``device_memory_size_v2``)."""
        return max(p.activation_bytes for p in self.profiles)

    @property
    def io_bytes(self) -> int:
        return max(p.io_bytes for p in self.profiles)

    def triton_activation_bytes(self, strategy: str = "STATIC", instances: int = 1) -> int:
        """What Triton's TensorRT backend allocates for this model: one context per profile per instance,
        each the plan's largest (STATIC) or its own profile's (ON_PROFILE_CHANGE) activation memory."""
        per_context = ([self.activation_bytes] * len(self.profiles) if strategy == "STATIC"
                       else [p.activation_bytes for p in self.profiles])
        return instances * sum(per_context)


@dataclass(frozen=True)
class Totals:
    weights: int
    activations: int
    io: int
    contexts: int

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.io + self.contexts


@dataclass
class MemoryPlan:
    """The plans of one build and what they need on one GPU."""

    label: str  # e.g. "full 512x512 fps low+medium+high"
    stages: list[StagePlan]
    gpu: GpuSpec
    strategy: str = "STATIC"  # Triton's execution_context_allocation_strategy
    notes: list[str] = field(default_factory=list)

    def tensorrt_totals(self) -> Totals:
        return Totals(sum(s.weight_bytes for s in self.stages),
                      max((s.activation_bytes for s in self.stages), default=0),
                      sum(s.io_bytes for s in self.stages), CUDA_CONTEXT_BYTES)

    def triton_totals(self) -> Totals:
        return Totals(sum(s.weight_bytes for s in self.stages),
                      sum(s.triton_activation_bytes(self.strategy) for s in self.stages),
                      sum(s.io_bytes for s in self.stages), TRITON_PROCESSES * CUDA_CONTEXT_BYTES)

    def totals(self, backend: str) -> Totals:
        return self.tensorrt_totals() if backend == "tensorrt" else self.triton_totals()

    def spare(self, backend: str) -> float:
        """Fraction of the GPU left free (negative: it does not fit)."""
        return 1.0 - self.totals(backend).total / self.gpu.memory

    def fits(self, backend: str, min_spare: float = 0.0) -> bool:
        return self.spare(backend) >= min_spare


def _weight_bytes(network: nn.Module, used: Iterable[str], precision: str, text_encoder: bool) -> int:
    """Bytes of the used parameters and buffers at the plan's precision. The BF16 text encoder keeps
    1-D parameters (norm scales) in FP32 (see kvt.engines.precision)."""
    tensors: dict[str, torch.Tensor] = dict(network.named_parameters())
    tensors.update(dict(network.named_buffers()))
    total = 0
    for name in dict.fromkeys(used):
        tensor = tensors.get(name.removeprefix("network."))
        if tensor is None or not tensor.is_floating_point():
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
            continue
        element = _BYTES[precision]
        if precision == "bf16" and text_encoder and tensor.dim() < 2:
            element = 4
        total += tensor.numel() * element
    return total


def _profile_max(profile: Profile) -> dict[str, int]:
    return {name: dim.max for name, dim in profile.items()}


@dataclass(frozen=True)
class PlanRequest:
    """What to plan: the model, the profiles' source and precisions."""

    config: KandinskyVideoConfig
    t5_config: Any
    table: StageTable
    profiles: Mapping[str, Sequence[Profile]]  # stage -> profiles (kvt.contract.profiles.select_profiles)
    precisions: Mapping[str, str]  # stage -> "fp16" / "fp32" / "bf16"
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES
    # stage -> attention dtypes whose unfused worst case is counted (None: every non-FP16/BF16 dtype)
    unfused_dtypes: Mapping[str, frozenset[torch.dtype]] | None = None


_SHARED: Planner | None = None


def onnx_to_torch_dtype(elem_type: int) -> torch.dtype | None:
    """The torch dtype of an ONNX element type (floating types only)."""
    return {1: torch.float32, 10: torch.float16, 16: torch.bfloat16}.get(elem_type)


class Planner:
    """Traces stage calls on the meta device (cached per stage, dims and precision) and makes plans."""

    @classmethod
    def shared(cls) -> Planner:
        """One planner per process, so repeated builds reuse its traces."""
        global _SHARED
        if _SHARED is None:
            _SHARED = cls()
        return _SHARED

    def __init__(self) -> None:
        self._networks: dict[tuple[int, str, str], nn.Module] = {}
        self._traces: dict[tuple[int, str, tuple[tuple[str, int], ...], str], tuple[CallTrace, int]] = {}

    def _network(self, request: PlanRequest, name: str, precision: str) -> nn.Module:
        key = (id(request.config), name, precision)
        if key not in self._networks:
            network = build_network(name, request.config, request.t5_config, device="meta")
            # The BF16 text encoder's activations stay FP32 (only its GEMMs run in BF16): trace it in FP32.
            trace_dtype = torch.float32 if network_spec(name).family == "text_encoder" else _DTYPES[precision]
            self._networks[key] = network.to(trace_dtype).eval()
        return self._networks[key]

    def _trace(self, request: PlanRequest, spec: StageSpec, dims: Mapping[str, int], precision: str) -> tuple[CallTrace, int]:
        key = (id(request.config), spec.name, tuple(sorted(dims.items())), precision)
        if key not in self._traces:
            network = self._network(request, spec.network, precision)
            trace = trace_call(stage_module(spec.name, network), spec, dims)
            family = network_spec(spec.network).family
            weights = _weight_bytes(network, trace.used_parameters, precision, family == "text_encoder")
            self._traces[key] = (trace, weights)
        return self._traces[key]

    def stage_plan(self, request: PlanRequest, stage: str) -> StagePlan:
        spec = request.table[stage]
        precision = request.precisions[stage]
        profiles = []
        weights = 0
        counted_dtypes = None if request.unfused_dtypes is None else request.unfused_dtypes.get(stage, frozenset())
        counted_any = False
        for profile in request.profiles[stage]:
            dims = _profile_max(profile)
            trace, weights = self._trace(request, spec, dims, precision)
            worst = max((c.score_bytes() for c in trace.attention), default=0)
            if counted_dtypes is None:
                counted = [c for c in trace.attention if c.dtype not in (torch.float16, torch.bfloat16)]
            else:
                counted = [c for c in trace.attention if c.dtype in counted_dtypes]
            attention = max((c.score_bytes() for c in counted), default=0)
            counted_any |= attention > 0
            profiles.append(ProfileMemory(dims, trace.live_peak, request.workspace_bytes, attention, worst,
                                          trace.io_bytes))
        if not any(p.attention_worst for p in profiles):
            note = "no attention"
        elif counted_any:
            note = "unfused, counted (FP32, or not in the fusable form)"
        else:
            note = "fused (fusable form, FP16/BF16)"
        return StagePlan(stage, precision, weights, tuple(profiles), note)

    def plan(self, request: PlanRequest, gpu: GpuSpec, label: str, strategy: str = "STATIC") -> MemoryPlan:
        stages = [self.stage_plan(request, name) for name in request.table.names if name in request.profiles]
        return MemoryPlan(label, stages, gpu, strategy)


# ------------------------------------------------------------------------------------- requests

def default_precisions(table: StageTable, text_encoder: str = "bf16", fp16_movq: bool = False) -> dict[str, str]:
    """The fp16 export's policy (FP16 U-Nets, FP32 MoVQs unless ``fp16_movq``) and the text encoder's
    plan precision (``kvt build --text-encoder-precision``)."""
    out = {}
    for spec in table:
        family = network_spec(spec.network).family
        if family == "unet":
            out[spec.name] = "fp16"
        elif family == "movq":
            out[spec.name] = "fp16" if fp16_movq else "fp32"
        else:
            out[spec.name] = text_encoder
    return out


def preset_request(preset: str, resolutions: Sequence[Resolution], fps_modes: Sequence[str],
                   text_encoder: str = "bf16", workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
                   stages: Sequence[str] | None = None, table_batch: bool = False,
                   precisions: Mapping[str, str] | None = None,
                   unfused_dtypes: Mapping[str, frozenset[torch.dtype]] | None = None) -> PlanRequest:
    """A request for a preset's networks and the profiles ``kvt build`` would choose."""
    from transformers import T5Config  # heavy: imported when a text encoder is planned

    if text_encoder not in PRECISIONS:
        raise UserError(f"text encoder precision {text_encoder!r}: allowed {list(PRECISIONS)}")
    chosen = get_preset(preset)
    table = stage_table_for(chosen.config)
    profiles = select_profiles(table, resolutions, fps_modes, stages, table_batch=table_batch)
    return PlanRequest(chosen.config, T5Config(**chosen.t5), table, profiles,
                       dict(precisions) if precisions is not None else default_precisions(table, text_encoder),
                       workspace_bytes, unfused_dtypes)


def architecture_request(configs: Mapping[str, Any], t5: Mapping[str, Any], precisions: Mapping[str, str],
                         where: str) -> PlanRequest:
    """A request for the networks an export records (``model.configs`` / ``model.t5`` of its manifest):
    any checkpoint's architecture, not only a preset's. Its table and profiles are set by the caller."""
    from transformers import T5Config  # heavy: imported when a text encoder is planned

    config = KandinskyVideoConfig.from_dict(configs, where)
    table = stage_table_for(config)
    return PlanRequest(config, T5Config(**t5), table, {}, dict(precisions))


def describe_request(preset: str, resolutions: Sequence[Resolution], fps_modes: Sequence[str]) -> str:
    sizes = "+".join(str(r) for r in resolutions) or "table range"
    return f"{preset} {sizes} fps {'+'.join(fps_modes) or 'all'}"


# ------------------------------------------------------------------------------------- rendering

def _gib(value: int) -> str:
    return f"{value / GIB:.1f}"


def render_breakdown(plan: MemoryPlan) -> str:
    """Per stage and the two totals (GiB), as ``kvt plan-memory`` prints it."""
    lines = [f"memory plan: {plan.label} on {plan.gpu} (computed on the meta device, not measured)",
             "",
             "| stage | precision | weights | activations (max profile) | of which workspace / unfused attention | I/O | Triton contexts | attention |",
             "|---|---|---|---|---|---|---|---|"]
    for stage in plan.stages:
        top = max(stage.profiles, key=lambda p: p.activation_bytes)
        lines.append(
            f"| {stage.stage} | {stage.precision} | {_gib(stage.weight_bytes)} | {_gib(stage.activation_bytes)} "
            f"| {_gib(top.workspace_bytes)} / {_gib(top.attention_bytes)} | {_gib(stage.io_bytes)} "
            f"| {len(stage.profiles)} x {_gib(stage.triton_activation_bytes(plan.strategy) // len(stage.profiles))} "
            f"| {stage.attention} |")
    lines.append("")
    lines.append("| backend | weights | activations | I/O | CUDA contexts | total | GPU | spare |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for backend in ("tensorrt", "triton"):
        totals = plan.totals(backend)
        lines.append(f"| {backend} | {_gib(totals.weights)} | {_gib(totals.activations)} | {_gib(totals.io)} "
                     f"| {_gib(totals.contexts)} | {_gib(totals.total)} | {_gib(plan.gpu.memory)} "
                     f"| {plan.spare(backend) * 100:.0f} % |")
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def render_summary(plans: Sequence[MemoryPlan]) -> str:
    """One row per plan: totals and spare per backend (GiB), as the docs' size table shows them."""
    lines = ["| build | GPU | weights | TensorRT backend: activations / total / spare | Triton: activations / total / spare |",
             "|---|---|---|---|---|"]
    for plan in plans:
        trt_totals, triton = plan.tensorrt_totals(), plan.triton_totals()
        lines.append(f"| {plan.label} | {plan.gpu.name} | {_gib(trt_totals.weights)} "
                     f"| {_gib(trt_totals.activations)} / {_gib(trt_totals.total)} / {plan.spare('tensorrt') * 100:.0f} % "
                     f"| {_gib(triton.activations)} / {_gib(triton.total)} / {plan.spare('triton') * 100:.0f} % |")
    return "\n".join(lines)


def plan_to_dict(plan: MemoryPlan) -> dict[str, Any]:
    return {
        "label": plan.label, "gpu": {"name": plan.gpu.name, "bytes": plan.gpu.memory},
        "triton_allocation_strategy": plan.strategy,
        "stages": [{"stage": s.stage, "precision": s.precision, "weight_bytes": s.weight_bytes,
                    "activation_bytes": s.activation_bytes, "io_bytes": s.io_bytes, "attention": s.attention,
                    "triton_activation_bytes": s.triton_activation_bytes(plan.strategy),
                    "profiles": [{"dims": dict(p.dims), "live_bytes": p.live_bytes,
                                  "workspace_bytes": p.workspace_bytes, "attention_bytes": p.attention_bytes,
                                  "attention_worst_bytes": p.attention_worst, "io_bytes": p.io_bytes}
                                 for p in s.profiles]} for s in plan.stages],
        "totals": {backend: {**vars(plan.totals(backend)), "total": plan.totals(backend).total,
                             "spare": round(plan.spare(backend), 4)} for backend in ("tensorrt", "triton")},
        "notes": list(plan.notes),
    }


def require_fit(plan: MemoryPlan, backends: Iterable[str], min_spare: float) -> None:
    """Raise :class:`MemoryPlanError` with the breakdown when ``plan`` does not fit for some backend."""
    failing = [b for b in backends if not plan.fits(b, min_spare)]
    if failing:
        need = ", ".join(f"{b} {_gib(plan.totals(b).total)} GiB" for b in failing)
        raise MemoryPlanError(
            f"{plan.label} does not fit {plan.gpu} with {min_spare * 100:.0f} % to spare ({need}):\n"
            f"{render_breakdown(plan)}\nTighten the profiles (`--resolution`, `--fps`), use the BF16 text "
            "encoder, or a GPU with more memory")


def with_gpu(plan: MemoryPlan, gpu: GpuSpec) -> MemoryPlan:
    return replace(plan, gpu=gpu)
