"""``config.pbtxt`` of every model in the repository, derived from the stage table and the plans.

Stage models: inputs and outputs come from :class:`StageSpec` (names, dtypes, static sizes; a dynamic
dimension is -1). What a stage model serves is computed once per stage (:class:`StageServing`): the
profiles of its plans (TensorRT; the table's own ranges otherwise) and Triton's batch limit. The stage
config, its warm-up samples, the tokenizer and the ``text_encoding`` ensemble all read that one record,
so they cannot disagree (Triton refuses an ensemble whose batch limit exceeds a member's).

A stage whose rows are independent across requests (its ``batch_independent`` role) declares its first
dimension as Triton's batch dimension and gets dynamic batching; the others keep the batch dimension in
``dims`` and ``max_batch_size: 0``, because concatenating two requests there would mix them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvt.contract.dtypes import DType
from kvt.contract.profiles import Profile, call_fits, profiles_from_key
from kvt.contract.stages import StageSpec, StageTable, TensorSpec
from kvt.formats.engine_dir import PlanEntry
from kvt.formats.triton_repo import (
    ONNXRUNTIME,
    PYTHON_ORT,
    TENSORRT,
    TEXT_ENCODING_MODEL,
    TOKENIZER_MODEL,
    RepositoryError,
    batch_dim,
    max_batch_size,
)
from kvt.serving import protocol
from kvt.serving.generator.pbtxt import Enum, render

TENSORRT_ALLOCATION = ("STATIC", "ON_PROFILE_CHANGE")  # the TensorRT backend's allocation strategies


@dataclass(frozen=True)
class Placement:
    """Where a model's instances run: ``count`` instances on each listed GPU."""

    count: int = 1
    gpus: tuple[int, ...] = ()


@dataclass(frozen=True)
class RepositoryOptions:
    """Knobs of the generated configs that do not come from the stage table."""

    backend: str = PYTHON_ORT
    placements: dict[str, Placement] = field(default_factory=dict)  # model name -> placement
    orchestrator_device: str | None = None  # "cpu" or "cuda"; default: cuda unless python-ort
    intra_op_threads: int = 1  # python-ort stage sessions
    warmup: bool = True  # model_warmup on tensorrt / onnxruntime stages
    request_timeout_s: float = 600.0  # orchestrator: a request stops at the first step past this
    max_queue_size: int = 8  # orchestrator: requests waiting beyond this are refused at once
    queue_timeout_s: float = 300.0  # orchestrator: a request waiting longer is refused
    stage_timeout_s: float = 300.0  # orchestrator: one stage call taking longer fails the request
    default_gpus: tuple[int, ...] = (0,)  # GPUs of models without a placement: one request, one GPU
    tensorrt_allocation: str = "STATIC"  # execution_context_allocation_strategy of tensorrt_plan stages

    def __post_init__(self) -> None:
        if self.tensorrt_allocation not in TENSORRT_ALLOCATION:
            raise RepositoryError(f"TensorRT allocation strategy {self.tensorrt_allocation!r}: allowed: "
                                  f"{', '.join(TENSORRT_ALLOCATION)}")
        for name in ("max_queue_size",):
            if getattr(self, name) < 1:
                raise RepositoryError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("request_timeout_s", "queue_timeout_s", "stage_timeout_s"):
            if not getattr(self, name) > 0:
                raise RepositoryError(f"{name}={getattr(self, name)}: must be a positive number of seconds")

    @property
    def on_gpu(self) -> bool:
        return self.backend != PYTHON_ORT

    def device(self) -> str:
        return self.orchestrator_device or ("cuda" if self.on_gpu else "cpu")


@dataclass(frozen=True)
class StageServing:
    """What one stage model serves, computed once and read by every config that depends on it."""

    spec: StageSpec
    profiles: tuple[tuple[Profile, ...], ...]  # per plan (GPU architecture): its optimisation profiles
    max_batch: int  # Triton's max_batch_size (0: no Triton batching)
    plan_files: Mapping[str, str] | None = None  # compute capability -> plan file (tensorrt)

    @property
    def batched(self) -> bool:
        return self.max_batch > 0

    def to_data(self) -> list[list[dict[str, list[int]]]]:
        """The profiles as the orchestrator reads them (pipeline.json)."""
        return [[{n: [d.min, d.opt, d.max, d.multiple_of] for n, d in p.items()} for p in plan]
                for plan in self.profiles]


def plan_max_batch(spec: StageSpec, plan_profiles: Sequence[Profile]) -> int:
    """Triton's max_batch_size for a plan with these profiles: the table's, capped by the largest batch
    the plan accepts; 0 when a profile's batch range does not start at 1, since one request may bring
    fewer rows than that minimum and Triton would pass it to the plan alone."""
    name = batch_dim(spec)
    if name is None:
        return 0
    ranges = [profile[name] for profile in plan_profiles if name in profile]
    if any(d.min > 1 for d in ranges):
        return 0
    plan_max = max((d.max for d in ranges), default=max_batch_size(spec))
    return min(max_batch_size(spec), plan_max)


def stage_serving(spec: StageSpec, plans: Mapping[str, PlanEntry] | None = None,
                  plan_files: Mapping[str, str] | None = None) -> StageServing:
    """The one computation of a stage's profiles and batch limit: from its plans (one per compute
    capability) when it has some, else from the stage table (ONNX models serve the table's ranges)."""
    if not plans:
        return StageServing(spec, (tuple(spec.profiles),), max_batch_size(spec))
    profiles = tuple(profiles_from_key(entry.key.profiles) for entry in plans.values())
    counts = {len(p) for p in profiles}
    if len(counts) != 1:
        raise RepositoryError(f"stage {spec.name}: its plans for {sorted(plans)} have different numbers of "
                              f"optimisation profiles ({sorted(counts)}); rebuild them with the same flags")
    max_batch = min(plan_max_batch(spec, p) for p in profiles)
    return StageServing(spec, profiles, max_batch, plan_files)


# ---------------------------------------------------------------------------------------- pieces

def _dims(shape: Sequence[int | str], batched: bool) -> list[int]:
    dims = [entry if isinstance(entry, int) else -1 for entry in shape]
    dims = dims[1:] if batched else dims
    return dims or [1]  # Triton needs non-empty dims: a per-row scalar travels as [N, 1]


def _tensor(t: TensorSpec, batched: bool) -> list[tuple[str, Any]]:
    fields: list[tuple[str, Any]] = [("name", t.name), ("data_type", Enum(t.dtype.triton)),
                                     ("dims", _dims(t.shape, batched))]
    if batched and len(t.shape) == 1:
        fields.append(("reshape", [("shape", [])]))
    return fields


def _instance_group(name: str, options: RepositoryOptions, gpu: bool,
                    profiles: int = 0) -> list[list[tuple[str, Any]]]:
    """One instance group; on a GPU pinned to the placement's GPUs (default: ``options.default_gpus``,
    so every call of one request runs on one GPU); ``profiles``: the TensorRT plan's profile count,
    all listed (Triton's TensorRT backend otherwise uses profile 0 only)."""
    placement = options.placements.get(name, Placement())
    group: list[tuple[str, Any]] = [("count", placement.count), ("kind", Enum("KIND_GPU" if gpu else "KIND_CPU"))]
    gpus = placement.gpus or options.default_gpus
    if gpu and gpus:
        group.append(("gpus", list(gpus)))
    if profiles:
        group.append(("profile", [str(i) for i in range(profiles)]))
    return [group]


def _warmups(serving: StageServing) -> list[tuple[str, Any]]:
    """One warm-up sample per profile, at that profile's opt shapes (valid for every plan of the stage),
    so every execution context is exercised while the model loads. ``batch_size`` is the batch dim's opt
    for a batched stage, and 1 otherwise (Triton skips samples with batch_size 0)."""
    spec = serving.spec
    samples: list[tuple[str, Any]] = []
    name = batch_dim(spec) if serving.batched else None
    for index, profile in enumerate(serving.profiles[0]):
        dims = {n: d.opt for n, d in profile.items()}
        if not all(call_fits([[plan[index]]], dims) for plan in serving.profiles):
            continue  # plans built differently per GPU: no shape every one of them takes at this index
        inputs = []
        for t in spec.inputs:
            shape = list(t.concrete_shape(dims))
            shape = (shape[1:] or [1]) if serving.batched else shape
            value = ("random_data", True) if t.dtype in (DType.FP32, DType.FP16) else ("zero_data", True)
            inputs.append(("inputs", [("key", t.name), ("value", [
                ("data_type", Enum(t.dtype.triton)), ("dims", shape), value])]))
        batch = dims[name] if name is not None else 1
        samples.append(("model_warmup", [("name", f"{spec.name}_profile{index}"), ("batch_size", batch), *inputs]))
    return samples


def _parameters(values: Mapping[str, object]) -> list[tuple[str, Any]]:
    return [("parameters", [("key", k), ("value", [("string_value", str(v))])]) for k, v in values.items()]


def _context_len(table: StageTable) -> TensorSpec:
    """The official length L as the U-Nets take it (its dtype is the table's)."""
    for spec in table:
        for tensor in spec.inputs:
            if tensor.name == "context_len":
                return tensor
    raise RepositoryError("the stage table has no context_len input")


# ---------------------------------------------------------------------------------------- configs

def stage_config(serving: StageServing, options: RepositoryOptions) -> str:
    """config.pbtxt of one stage model for ``options.backend``."""
    spec = serving.spec
    config: list[tuple[str, Any]] = [("name", spec.name)]
    tensorrt = options.backend == TENSORRT
    if tensorrt:
        config.append(("platform", "tensorrt_plan"))
    elif options.backend == ONNXRUNTIME:
        config += [("platform", "onnxruntime_onnx"), ("default_model_filename", "model.onnx")]
    else:
        config.append(("backend", "python"))
    config.append(("max_batch_size", serving.max_batch))
    config += [("input", _tensor(t, serving.batched)) for t in spec.inputs]
    config += [("output", _tensor(t, serving.batched)) for t in spec.outputs]
    config.append(("instance_group", _instance_group(
        spec.name, options, options.on_gpu, len(serving.profiles[0]) if tensorrt else 0)))
    if serving.batched:
        # No added delay: requests are combined only when they are already waiting for the instance.
        config.append(("dynamic_batching", [("max_queue_delay_microseconds", 0)]))
    files = serving.plan_files or {}
    if len(files) > 1:
        config += [("cc_model_filenames", [("key", cc), ("value", fname)]) for cc, fname in sorted(files.items())]
    elif files:
        config.append(("default_model_filename", next(iter(files.values()))))
    if options.backend == PYTHON_ORT:
        config += _parameters({"onnx_file": "model.onnx", "intra_op_threads": options.intra_op_threads})
    else:
        if tensorrt:
            config += _parameters({"execution_context_allocation_strategy": options.tensorrt_allocation})
        if options.warmup:
            config += _warmups(serving)
    return render(config) + "\n"


def tokenizer_config(table: StageTable, options: RepositoryOptions, text_encoder: StageServing) -> str:
    """The python tokenizer: PROMPT -> the text encoder's inputs (+ the official length L); its batch
    limit is the text encoder's."""
    batched = text_encoder.batched
    lead = [] if batched else [-1]
    length = _context_len(table)
    config = [
        ("name", TOKENIZER_MODEL), ("backend", "python"), ("max_batch_size", text_encoder.max_batch),
        ("input", [("name", "PROMPT"), ("data_type", Enum(DType.STRING.triton)), ("dims", [*lead, 1])]),
        *[("output", [("name", t.name), ("data_type", Enum(t.dtype.triton)),
                      ("dims", [*lead, *_dims(t.shape, True)])]) for t in text_encoder.spec.inputs],
        ("output", [("name", length.name), ("data_type", Enum(length.dtype.triton)), ("dims", [*lead, 1])]),
        ("instance_group", _instance_group(TOKENIZER_MODEL, options, False)),
        *([("dynamic_batching", [("max_queue_delay_microseconds", 0)])] if batched else []),
        *_parameters({"tokens_length": table.model.tokens_length}),
    ]
    return render(config) + "\n"


def text_encoding_config(table: StageTable, text_encoder: StageServing) -> str:
    """Ensemble PROMPT -> tokenizer -> text_encoder (T5 + projection): context, mask and L, with the
    text encoder's batch limit."""
    spec = text_encoder.spec
    batched = text_encoder.batched
    lead = [] if batched else [-1]
    length = _context_len(table)
    tokenize = [("model_name", TOKENIZER_MODEL), ("model_version", -1),
                ("input_map", [("key", "PROMPT"), ("value", "PROMPT")]),
                *[("output_map", [("key", n), ("value", n)]) for n in (*spec.input_names, length.name)]]
    encode = [("model_name", spec.name), ("model_version", -1),
              *[("input_map", [("key", n), ("value", n)]) for n in spec.input_names],
              *[("output_map", [("key", n), ("value", n)]) for n in spec.output_names]]
    mask = next(t for t in spec.inputs if t.name == "attention_mask")
    config = [
        ("name", TEXT_ENCODING_MODEL), ("platform", "ensemble"), ("max_batch_size", text_encoder.max_batch),
        ("input", [("name", "PROMPT"), ("data_type", Enum(DType.STRING.triton)), ("dims", [*lead, 1])]),
        *[("output", [("name", t.name), ("data_type", Enum(t.dtype.triton)), ("dims", _dims(t.shape, batched))])
          for t in spec.outputs],
        ("output", [("name", mask.name), ("data_type", Enum(mask.dtype.triton)), ("dims", _dims(mask.shape, batched))]),
        ("output", [("name", length.name), ("data_type", Enum(length.dtype.triton)), ("dims", [*lead, 1])]),
        ("ensemble_scheduling", [("step", [tokenize, encode])]),
    ]
    return render(config) + "\n"


def orchestrator_config(name: str, options: RepositoryOptions, stream: bool,
                        served: Mapping[str, str] | None = None) -> str:
    """The BLS model that runs a whole generation (``stream``: decoupled, per-step progress).

    Its queue is bounded: beyond ``max_queue_size`` waiting requests, or after ``queue_timeout_s`` in the
    queue, a request is refused at once (UNAVAILABLE) instead of piling up behind minutes-long ones.
    """
    inputs = [("input", [("name", f.name), ("data_type", Enum(f.triton_type)), ("dims", [1]),
                         ("optional", f.name != protocol.PROMPT)]) for f in protocol.SCALAR_FIELDS]
    inputs.append(("input", [("name", protocol.IMAGE), ("data_type", Enum(DType.UINT8.triton)),
                             ("dims", [-1, -1, 3]), ("optional", True)]))
    inputs.append(("input", [("name", protocol.IMAGE_FILE), ("data_type", Enum(DType.STRING.triton)),
                             ("dims", [1]), ("optional", True)]))
    outputs = protocol.RESULT_OUTPUTS + (protocol.PROGRESS_OUTPUTS if stream else ())
    config: list[tuple[str, Any]] = [
        ("name", name), ("backend", "python"), ("max_batch_size", 0), *inputs,
        *[("output", [("name", n), ("data_type", Enum(t.triton)), ("dims", d)]) for n, t, d in outputs],
        ("instance_group", _instance_group(name, options, options.device() == "cuda")),
        ("dynamic_batching", [("default_queue_policy", [
            ("timeout_action", Enum("REJECT")),
            ("default_timeout_microseconds", int(options.queue_timeout_s * 1e6)),
            ("allow_timeout_override", True),
            ("max_queue_size", options.max_queue_size)])]),
    ]
    if stream:
        config.append(("model_transaction_policy", [("decoupled", True)]))
    config += _parameters({"device": options.device(), "torch_threads": options.intra_op_threads,
                           "request_timeout_s": options.request_timeout_s,
                           "stage_timeout_s": options.stage_timeout_s, **(served or {})})
    return render(config) + "\n"
