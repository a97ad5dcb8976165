"""``config.pbtxt`` of every model in the repository, derived from the stage table.

Stage models: inputs and outputs come from :class:`StageSpec` (names, dtypes, static sizes; a dynamic
dimension is -1). A stage whose rows are independent requests (its ``batch_independent`` role) declares its first
dimension as Triton's batch dimension (``max_batch_size`` = the table's max, dims without it) and gets
dynamic batching, so concurrent requests share one engine call; the others keep the batch dimension in
``dims`` and ``max_batch_size: 0``, because concatenating two requests there would mix them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvt.contract.dtypes import DType
from kvt.contract.stages import StageSpec, StageTable
from kvt.formats.triton_repo import (
    ONNXRUNTIME,
    PYTHON_ORT,
    TENSORRT,
    TEXT_ENCODING_MODEL,
    TOKENIZER_MODEL,
    batch_dim,
    max_batch_size,
)
from kvt.serving import protocol
from kvt.serving.generator.pbtxt import Enum, render


@dataclass(frozen=True)
class Placement:
    """Where a model's instances run: ``count`` instances on each listed GPU (all GPUs if empty)."""

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

    @property
    def on_gpu(self) -> bool:
        return self.backend != PYTHON_ORT

    def device(self) -> str:
        return self.orchestrator_device or ("cuda" if self.on_gpu else "cpu")


def _dims(shape: Sequence[int | str], batched: bool) -> list[int]:
    dims = [entry if isinstance(entry, int) else -1 for entry in shape]
    dims = dims[1:] if batched else dims
    return dims or [1]  # Triton needs non-empty dims: a per-row scalar travels as [N, 1]


def _tensor(t, batched: bool) -> list:
    fields = [("name", t.name), ("data_type", Enum(t.dtype.triton)), ("dims", _dims(t.shape, batched))]
    if batched and len(t.shape) == 1:
        fields.append(("reshape", [("shape", [])]))
    return fields


def _instance_group(name: str, options: RepositoryOptions, gpu: bool) -> list:
    placement = options.placements.get(name, Placement())
    group: list = [("count", placement.count), ("kind", Enum("KIND_GPU" if gpu else "KIND_CPU"))]
    if gpu and placement.gpus:
        group.append(("gpus", list(placement.gpus)))
    return [group]


def _warmup(spec: StageSpec, batched: bool) -> list:
    """One warm-up request at the table's opt shapes (first-call allocations happen at load time)."""
    dims = spec.opt_dims()
    inputs = []
    for t in spec.inputs:
        shape = list(t.concrete_shape(dims))
        shape = (shape[1:] or [1]) if batched else shape
        value = ("random_data", True) if t.dtype.triton in ("TYPE_FP32", "TYPE_FP16") else ("zero_data", True)
        inputs.append(("inputs", [("key", t.name), ("value", [
            ("data_type", Enum(t.dtype.triton)), ("dims", shape), value])]))
    batch = 0
    if batched:
        name = batch_dim(spec)
        assert name is not None  # a batched stage has a batch dim (max_batch_size > 0)
        batch = dims[name]
    return [("name", f"{spec.name}_opt"), ("batch_size", batch), *inputs]


def plan_max_batch(spec: StageSpec, profiles) -> int:
    """Triton's max_batch_size for plans built with ``profiles`` (BuildKey.profiles: per profile
    (dim, min, opt, max) tuples): the table's, capped by the largest batch every plan accepts."""
    name = batch_dim(spec)
    if name is None:
        return 0
    ranges = [d for profile in profiles for d in profile if d[0] == name]
    # Triton's TensorRT backend treats the first dim as its batch dim only when every profile starts at
    # batch 1 (it may send a single request's rows alone); the U-Nets' profiles start at 2 / 36 rows,
    # so those stages keep the batch in dims (max_batch_size 0) on tensorrt_plan.
    if any(d[1] > 1 for d in ranges):
        return 0
    plan_max = max((d[3] for d in ranges), default=max_batch_size(spec))
    return min(max_batch_size(spec), plan_max)


def _parameters(values: Mapping[str, object]) -> list[tuple[str, Any]]:
    return [("parameters", [("key", k), ("value", [("string_value", str(v))])]) for k, v in values.items()]


def stage_config(spec: StageSpec, options: RepositoryOptions, plan_files: dict[str, str] | None = None,
                 max_batch: int | None = None) -> str:
    """config.pbtxt of one stage model for ``options.backend``.

    ``plan_files``: compute capability -> plan file name, for per-GPU-arch plans (tensorrt only).
    ``max_batch``: Triton's max_batch_size when it must be below the table's (plans built for a smaller
    batch range); 0 turns Triton batching off for the stage.
    """
    max_batch = max_batch_size(spec) if max_batch is None else max_batch
    batched = max_batch > 0
    config: list = [("name", spec.name)]
    if options.backend == TENSORRT:
        config.append(("platform", "tensorrt_plan"))
    elif options.backend == ONNXRUNTIME:
        config += [("platform", "onnxruntime_onnx"), ("default_model_filename", "model.onnx")]
    else:
        config.append(("backend", "python"))
    config.append(("max_batch_size", max_batch))
    config += [("input", _tensor(t, batched)) for t in spec.inputs]
    config += [("output", _tensor(t, batched)) for t in spec.outputs]
    config.append(("instance_group", _instance_group(spec.name, options, options.on_gpu)))
    if batched:
        # No added delay: requests are combined only when they are already waiting for the instance.
        config.append(("dynamic_batching", [("max_queue_delay_microseconds", 0)]))
    if plan_files and len(plan_files) > 1:
        config += [("cc_model_filenames", [("key", cc), ("value", fname)]) for cc, fname in sorted(plan_files.items())]
    elif plan_files:
        config.append(("default_model_filename", next(iter(plan_files.values()))))
    if options.backend == PYTHON_ORT:
        config += _parameters({"onnx_file": "model.onnx", "intra_op_threads": options.intra_op_threads})
    elif options.warmup:
        config.append(("model_warmup", [_warmup(spec, batched)]))
    return render(config) + "\n"


def tokenizer_config(table: StageTable, options: RepositoryOptions) -> str:
    """The python tokenizer: PROMPT -> the text encoder's inputs (+ the official length L)."""
    S = table.model.tokens_length
    batch = max_batch_size(table["text_encoder"])
    config = [
        ("name", TOKENIZER_MODEL), ("backend", "python"), ("max_batch_size", batch),
        ("input", [("name", "PROMPT"), ("data_type", Enum("TYPE_STRING")), ("dims", [1])]),
        *[("output", [("name", t.name), ("data_type", Enum(t.dtype.triton)), ("dims", [S])])
          for t in table["text_encoder"].inputs],
        ("output", [("name", "context_len"), ("data_type", Enum("TYPE_FP32")), ("dims", [1])]),
        ("instance_group", _instance_group(TOKENIZER_MODEL, options, False)),
        ("dynamic_batching", [("max_queue_delay_microseconds", 0)]),
        *_parameters({"tokens_length": S}),
    ]
    return render(config) + "\n"


def text_encoding_config(table: StageTable) -> str:
    """Ensemble PROMPT -> tokenizer -> text_encoder (T5 + projection): context, mask and L."""
    spec = table["text_encoder"]
    S, D = table.model.tokens_length, table.model.context_dim
    tokenize = [("model_name", TOKENIZER_MODEL), ("model_version", -1),
                ("input_map", [("key", "PROMPT"), ("value", "PROMPT")]),
                *[("output_map", [("key", n), ("value", n)]) for n in (*spec.input_names, "context_len")]]
    encode = [("model_name", spec.name), ("model_version", -1),
              *[("input_map", [("key", n), ("value", n)]) for n in spec.input_names],
              *[("output_map", [("key", n), ("value", n)]) for n in spec.output_names]]
    config = [
        ("name", TEXT_ENCODING_MODEL), ("platform", "ensemble"), ("max_batch_size", max_batch_size(spec)),
        ("input", [("name", "PROMPT"), ("data_type", Enum("TYPE_STRING")), ("dims", [1])]),
        ("output", [("name", "context"), ("data_type", Enum("TYPE_FP32")), ("dims", [S, D])]),
        ("output", [("name", "attention_mask"), ("data_type", Enum("TYPE_INT32")), ("dims", [S])]),
        ("output", [("name", "context_len"), ("data_type", Enum("TYPE_FP32")), ("dims", [1])]),
        ("ensemble_scheduling", [("step", [tokenize, encode])]),
    ]
    return render(config) + "\n"


def orchestrator_config(name: str, options: RepositoryOptions, stream: bool) -> str:
    """The BLS model that runs a whole generation (``stream``: decoupled, per-step progress)."""
    inputs = [("input", [("name", f.name), ("data_type", Enum(f.triton_type)), ("dims", [1]),
                         ("optional", True)]) for f in protocol.SCALAR_FIELDS]
    inputs.append(("input", [("name", protocol.IMAGE), ("data_type", Enum(DType.UINT8.triton)),
                             ("dims", [-1, -1, 3]), ("optional", True)]))
    inputs.append(("input", [("name", protocol.IMAGE_FILE), ("data_type", Enum(DType.STRING.triton)),
                             ("dims", [1]), ("optional", True)]))
    outputs = protocol.RESULT_OUTPUTS + (protocol.PROGRESS_OUTPUTS if stream else ())
    config: list[tuple[str, Any]] = [
        ("name", name), ("backend", "python"), ("max_batch_size", 0), *inputs,
        *[("output", [("name", n), ("data_type", Enum(t.triton)), ("dims", d)]) for n, t, d in outputs],
        ("instance_group", _instance_group(name, options, options.device() == "cuda")),
    ]
    if stream:
        config.append(("model_transaction_policy", [("decoupled", True)]))
    config += _parameters({"device": options.device(), "torch_threads": options.intra_op_threads,
                           "request_timeout_s": options.request_timeout_s})
    return render(config) + "\n"
