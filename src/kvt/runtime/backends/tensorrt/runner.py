"""The engine runner: one deserialized plan, its execution contexts, buffers and execution.

Execution uses TensorRT's name-based tensor API on torch CUDA tensors: ``set_input_shape`` and
``set_tensor_address``, then ``execute_async_v3`` on a CUDA stream. Nothing inside a call waits for
the GPU or copies through the host: output shapes come from the stage table (checked against
TensorRT's once per shape), inputs are used in place when they already are contiguous CUDA tensors of
the engine's dtype whose address has TensorRT's 256-byte alignment (``setTensorAddress``: "The pointer
must have at least 256-byte alignment"); others are copied.

Memory: contexts are created with USER_MANAGED activation memory and all engines of a backend share one
:class:`ActivationArena` (the stages run one after another on one stream, so one buffer serves them
all). The arena is sized for the shapes in use, not for the plan's largest profile: after a context's
input shapes change, ``update_device_memory_size_for_shapes`` says what those shapes need and the
arena grows to it (plans are built with TensorRT's RUNTIME_ACTIVATION_RESIZE preview feature, which
lets that size follow the shapes). Output buffers are kept per shape and reused (``reuse_outputs``);
a caller that keeps an output past the next call with the same shape must clone it.

Engines with several optimisation profiles (the interpolation U-Net) get one context per profile; a
call picks the profile whose ranges contain its shapes and whose opt shapes are nearest.

CUDA graphs (``cuda_graphs=True``), per shape, on static input and output buffers:

1. the first call of a shape runs uncaptured (TensorRT finishes its lazy setup);
2. the second copies its inputs into the static buffers, runs once uncaptured on exactly those buffers
   (the warm-up trtexec also does on the buffers it captures), keeps the result, then captures
   ``execute_async_v3`` in thread-local capture mode (other threads of a server may keep allocating).
   TensorRT reports an enqueue it cannot capture by *returning False* while the capture itself ends
   cleanly (trtexec's sampleInference.cpp / sampleDevice.h): such a graph is empty and is never
   stored. The outputs are then poisoned with NaN, the graph is replayed once and its outputs must
   equal the uncaptured run's (an empty or stale graph leaves NaN): only then is the graph kept;
3. later calls copy inputs in and replay. A shape whose capture fails runs uncaptured from then on.

A captured graph belongs to one arena allocation; growing the arena re-captures.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

import torch

from kvt.contract.dtypes import DType
from kvt.contract.errors import KvtError
from kvt.contract.stages import StageSpec
from kvt.runtime.backends.tensorrt.trt_env import check_tensorrt_version, import_tensorrt, make_logger

log = logging.getLogger(__name__)

ShapeKey = tuple[tuple[str, tuple[int, ...]], ...]
# (min, opt, max) shape of one input in one optimisation profile
ProfileRange = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
# TensorRT's I/O address alignment (NvInferRuntime.h, IExecutionContext::setTensorAddress).
IO_ALIGNMENT = 256
# First replay vs uncaptured run of the same context, buffers and inputs: equal up to tactics that are
# not bitwise deterministic (split-K reductions); an empty or stale graph is far outside (NaN).
REPLAY_RTOL, REPLAY_ATOL = 1e-2, 1e-3


class EngineError(KvtError, RuntimeError):
    """A plan cannot be loaded or does not match the stage it is meant to run."""


def torch_dtype(trt_type: Any) -> torch.dtype:
    """torch dtype of a TensorRT DataType (by enum member name, so a fake library works too)."""
    try:
        return DType.of_tensorrt(trt_type).torch
    except TypeError:
        raise EngineError(f"TensorRT data type {trt_type} has no torch equivalent here") from None


def aligned_empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device,
                  alignment: int = IO_ALIGNMENT) -> torch.Tensor:
    """An uninitialised tensor whose address is a multiple of ``alignment`` (torch's CUDA allocator
    already gives 512-byte blocks; the CPU allocator of the fake-library tests does not)."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    if out.data_ptr() % alignment == 0:
        return out
    nbytes = out.numel() * out.element_size()
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8, device=device)
    offset = (-raw.data_ptr()) % alignment
    return raw[offset:offset + nbytes].view(dtype).view(tuple(shape))


def aligned(tensor: torch.Tensor, alignment: int = IO_ALIGNMENT) -> torch.Tensor:
    """``tensor`` (contiguous) itself when its address is aligned, else a copy in an aligned buffer."""
    if tensor.data_ptr() % alignment == 0:
        return tensor
    out = aligned_empty(tensor.shape, tensor.dtype, tensor.device, alignment)
    out.copy_(tensor)
    return out


class ActivationArena:
    """One device buffer for the activations of engines that run in turn (grown on demand, never shrunk).

    Allocated on the stream that runs the engines, so the caching allocator orders its reuse after the
    work that last used it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffer: torch.Tensor | None = None
        self.generation = 0  # bumped on every reallocation: captured graphs of older ones are stale

    @property
    def nbytes(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel()

    def reserve(self, nbytes: int, stream: torch.cuda.Stream | None = None) -> None:
        if nbytes <= self.nbytes:
            return
        self._buffer = None  # free first: the old and new buffers need not coexist
        context = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with context:
            self._buffer = aligned_empty((nbytes,), torch.uint8, self.device)
        self.generation += 1

    def pointer(self) -> int:
        return 0 if self._buffer is None else self._buffer.data_ptr()

    def release(self) -> None:
        self._buffer = None


class GraphCapture(Protocol):
    """How a CUDA graph of one enqueue is captured and replayed (torch's, or a test's stand-in)."""

    def capture(self, enqueue: Callable[[int], bool], stream: Any) -> Any | None:
        """Capture ``enqueue(stream handle)``; None when the enqueue returned False (nothing to keep)."""

    def replay(self, graph: Any, stream: Any) -> None: ...


class TorchGraphCapture:
    """torch.cuda.graph in thread-local capture mode on a side stream ordered after ``stream``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def capture(self, enqueue: Callable[[int], bool], stream: Any) -> Any | None:
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]  # unannotated in torch
        side.wait_stream(stream)
        ok = False
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            ok = bool(enqueue(side.cuda_stream))
        stream.wait_stream(side)
        return graph if ok else None

    def replay(self, graph: Any, stream: Any) -> None:
        with torch.cuda.stream(stream):
            graph.replay()


@dataclass
class _Binding:
    """Everything prepared for one input-shape combination."""

    profile: int
    outputs: dict[str, torch.Tensor]
    calls: int = 0
    graph: Any = None  # a captured graph (torch.cuda.CUDAGraph)
    graph_generation: int = -1
    graph_failed: bool = False
    static_inputs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    is_input: bool
    dtype: torch.dtype


def choose_profile(ranges: Sequence[Mapping[str, ProfileRange]],
                   shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """Index of the profile whose (min, opt, max) per input contain ``shapes``, nearest opt first."""
    best: tuple[int, int] | None = None
    for index, profile in enumerate(ranges):
        distance = 0
        fits = True
        for name, shape in shapes.items():
            if name not in profile:
                continue  # a static input
            low, opt, high = profile[name]
            if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
                fits = False
                break
            distance += sum(abs(s - o) for s, o in zip(shape, opt))
        if fits and (best is None or distance < best[0]):
            best = (distance, index)
    return None if best is None else best[1]


def outputs_match(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> bool:
    """Whether a replay reproduced an uncaptured run (NaN anywhere in ``got`` never matches)."""
    for name, reference in want.items():
        value = got[name]
        if value.is_floating_point():
            if not bool(torch.isfinite(value).all()) and bool(torch.isfinite(reference).all()):
                return False
            if not torch.allclose(value.float(), reference.float(), rtol=REPLAY_RTOL, atol=REPLAY_ATOL,
                                  equal_nan=True):
                return False
        elif not torch.equal(value, reference):
            return False
    return True


class Engine:
    """A TensorRT plan ready to run one stage on CUDA tensors."""

    def __init__(self, plan: bytes | memoryview | Any, spec: StageSpec, device: torch.device | str = "cuda", *,
                 arena: ActivationArena | None = None, reuse_outputs: bool = True,
                 cuda_graphs: bool = False, trt: ModuleType | None = None, name: str = "",
                 graph_capture: GraphCapture | None = None) -> None:
        """``plan``: the serialized engine, any buffer (bytes, a memoryview of an mmap). ``graph_capture``
        replaces torch's CUDA graphs (tests drive the capture logic on the CPU with a fake library)."""
        self.trt = trt or import_tensorrt()
        check_tensorrt_version(self.trt)
        self.spec = spec
        self.device = torch.device(device)
        self.name = name or spec.name
        self.reuse_outputs = reuse_outputs
        self.cuda_graphs = cuda_graphs
        self.arena = arena if arena is not None else ActivationArena(self.device)
        self._graphs: GraphCapture | None = graph_capture
        if cuda_graphs and self._graphs is None and self.device.type == "cuda":
            self._graphs = TorchGraphCapture(self.device)
        self._bindings: dict[ShapeKey, _Binding] = {}
        self._contexts: dict[Any, Any] = {}
        # id(context) -> (shapes last set on it, activation bytes they need)
        self._context_state: dict[int, tuple[ShapeKey, int]] = {}
        self._last_stream: torch.cuda.Stream | None = None
        self._logger = make_logger(self.trt)
        trt = self.trt
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            errors = "; ".join(self._logger.errors[-3:]) or "no detail"
            raise EngineError(f"{self.name}: TensorRT {trt.__version__} could not deserialize the plan "
                              f"(built by another TensorRT version or for another GPU?): {errors}")
        self.tensors = self._read_io()
        self._check_contract()
        self.profile_ranges = self._read_profiles()

    # -------------------------------------------------------------- load-time checks

    def _read_io(self) -> dict[str, TensorInfo]:
        trt, engine = self.trt, self.engine
        out = {}
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            out[name] = TensorInfo(name, is_input, torch_dtype(engine.get_tensor_dtype(name)))
        return out

    def _check_contract(self) -> None:
        spec = self.spec
        inputs = sorted(n for n, t in self.tensors.items() if t.is_input)
        outputs = sorted(n for n, t in self.tensors.items() if not t.is_input)
        if inputs != sorted(spec.input_names) or outputs != sorted(spec.output_names):
            raise EngineError(f"{self.name}: the plan's inputs {inputs} / outputs {outputs} are not stage "
                              f"{spec.name!r}'s {list(spec.input_names)} / {list(spec.output_names)}")
        for tensor in spec.inputs + spec.outputs:
            got = self.tensors[tensor.name].dtype
            if got != tensor.dtype.torch:
                raise EngineError(f"{self.name}: tensor {tensor.name!r} is {got} in the plan, the contract "
                                  f"says {tensor.dtype.value}")

    def _read_profiles(self) -> list[dict[str, ProfileRange]]:
        engine = self.engine
        ranges: list[dict[str, ProfileRange]] = []
        for index in range(engine.num_optimization_profiles):
            profile: dict[str, ProfileRange] = {}
            for tensor in self.spec.inputs:
                if all(isinstance(e, int) for e in tensor.shape):
                    continue
                low, opt, high = engine.get_tensor_profile_shape(tensor.name, index)
                profile[tensor.name] = (tuple(low), tuple(opt), tuple(high))
            ranges.append(profile)
        return ranges

    def layer_information(self) -> dict[str, Any]:
        """The engine inspector's JSON description of the plan's layers (names only, unless the plan was
        built with detailed profiling verbosity)."""
        inspector = self.engine.create_engine_inspector()
        info: dict[str, Any] = json.loads(inspector.get_engine_information(self.trt.LayerInformationFormat.JSON))
        return info

    @property
    def max_activation_bytes(self) -> int:
        """The plan's activation memory over all its profiles (``device_memory_size_v2``)."""
        return int(self.engine.device_memory_size_v2)

    # -------------------------------------------------------------- contexts and bindings

    def _context(self, profile: int, stream_handle: int, key: ShapeKey) -> Any:
        """One context per profile; under CUDA graphs one per shape (a graph keeps its context's state)."""
        slot = (profile, key) if self.cuda_graphs else profile
        context = self._contexts.get(slot)
        if context is None:
            trt = self.trt
            context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if context is None:
                raise EngineError(f"{self.name}: TensorRT could not create an execution context")
            if self.engine.num_optimization_profiles > 1:
                try:
                    accepted = context.set_optimization_profile_async(profile, stream_handle)
                except RuntimeError as exc:  # the binding raises where the C++ API returns false
                    raise EngineError(f"{self.name}: TensorRT refused optimisation profile {profile}: {exc}") from None
                if accepted is False:
                    raise EngineError(f"{self.name}: TensorRT refused optimisation profile {profile}")
            self._contexts[slot] = context
        return context

    def _binding(self, key: ShapeKey, inputs: Mapping[str, torch.Tensor]) -> _Binding:
        binding = self._bindings.get(key)
        if binding is not None:
            return binding
        shapes = dict(key)
        profile = choose_profile(self.profile_ranges, shapes)
        if profile is None:
            raise EngineError(f"{self.name}: input shapes {shapes} are outside every optimisation profile of "
                              f"the plan ({self.profile_ranges}); rebuild with `kvt build --resolution ...`")
        dims = self.spec.bind_dims(inputs)
        outputs = {t.name: aligned_empty(t.concrete_shape(dims), t.dtype.torch, self.device) for t in self.spec.outputs}
        binding = _Binding(profile, outputs)
        if self.reuse_outputs or self.cuda_graphs:
            self._bindings[key] = binding
        return binding

    def _set_shapes(self, context: Any, key: ShapeKey, binding: _Binding) -> int:
        """Input shapes on ``context`` (only when they changed); returns the activation bytes they need."""
        state = self._context_state.get(id(context))
        if state is None or state[0] != key:
            for name, shape in key:
                if not context.set_input_shape(name, shape):
                    raise EngineError(f"{self.name}: TensorRT refused shape {shape} for {name!r}")
            # After every shape change (TensorRT: "Must specify all input shapes and the optimization
            # profile to use before calling this function").
            state = (key, int(context.update_device_memory_size_for_shapes()))
            self._context_state[id(context)] = state
        if binding.calls == 0:  # once per shape: the contract's output shapes are TensorRT's
            for name, out in binding.outputs.items():
                got = tuple(context.get_tensor_shape(name))
                if got != tuple(out.shape):
                    raise EngineError(f"{self.name}: TensorRT computes output {name!r} as {got}, the stage "
                                      f"table says {tuple(out.shape)}")
        return state[1]

    def _bind(self, context: Any, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor],
              needed: int, stream: torch.cuda.Stream | None) -> None:
        self.arena.reserve(needed, stream)
        for name, tensor in list(inputs.items()) + list(outputs.items()):
            context.set_tensor_address(name, tensor.data_ptr())
        context.set_device_memory(self.arena.pointer(), self.arena.nbytes)

    def _prepare_inputs(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for tensor in self.spec.inputs:
            value = inputs[tensor.name]
            if value.device != self.device:
                value = value.to(self.device, non_blocking=True)
            if value.dtype != tensor.dtype.torch:
                value = value.to(tensor.dtype.torch)
            out[tensor.name] = aligned(value.contiguous())
        return out

    # -------------------------------------------------------------- execution

    def __call__(self, inputs: Mapping[str, torch.Tensor], stream: torch.cuda.Stream | None = None) -> dict[str, torch.Tensor]:
        """Run on ``stream`` (default: torch's current stream); outputs are ready in stream order.

        A CPU ``device`` is accepted only so that unit tests can drive a fake of the library (stream 0).
        """
        on_cuda = self.device.type == "cuda"
        run_stream = (stream or torch.cuda.current_stream(self.device)) if on_cuda else None  # None iff not on_cuda
        handle = run_stream.cuda_stream if run_stream is not None else 0
        self._last_stream = run_stream
        # Copies, fills and allocations of this call go on the run stream, in order with the enqueues.
        with torch.cuda.stream(run_stream) if run_stream is not None else contextlib.nullcontext():
            return self._call(inputs, run_stream, handle)

    def _call(self, inputs: Mapping[str, torch.Tensor], run_stream: torch.cuda.Stream | None,
              handle: int) -> dict[str, torch.Tensor]:
        feeds = self._prepare_inputs(inputs)
        key: ShapeKey = tuple((name, tuple(t.shape)) for name, t in feeds.items())
        binding = self._binding(key, feeds)
        context = self._context(binding.profile, handle, key)
        if self._graphs is not None and self.cuda_graphs and not binding.graph_failed and binding.calls >= 1:
            self._run_graph(context, key, feeds, binding, run_stream)
        else:
            needed = self._set_shapes(context, key, binding)
            self._bind(context, feeds, binding.outputs, needed, run_stream)
            if not context.execute_async_v3(handle):
                raise EngineError(f"{self.name}: execute_async_v3 failed for shapes {dict(key)}")
        binding.calls += 1
        if run_stream is not None:
            for tensor in feeds.values():
                tensor.record_stream(run_stream)  # the caller may free inputs before the stream has read them
        if self.reuse_outputs:
            return dict(binding.outputs)
        if self.cuda_graphs:  # static graph buffers: the caller gets its own copy
            return {name: tensor.clone() for name, tensor in binding.outputs.items()}
        return dict(binding.outputs)

    def _run_graph(self, context: Any, key: ShapeKey, feeds: Mapping[str, torch.Tensor], binding: _Binding,
                   stream: torch.cuda.Stream | None) -> None:
        assert self._graphs is not None
        handle = stream.cuda_stream if stream is not None else 0
        if not binding.static_inputs:
            binding.static_inputs = {n: aligned_empty(t.shape, t.dtype, t.device) for n, t in feeds.items()}
        for name, tensor in feeds.items():
            binding.static_inputs[name].copy_(tensor)
        if binding.graph is not None and binding.graph_generation == self.arena.generation:
            self._graphs.replay(binding.graph, stream)
            return
        # (Re)capture: warm up on the very buffers the graph will use, keep that result as the reference.
        needed = self._set_shapes(context, key, binding)
        self._bind(context, binding.static_inputs, binding.outputs, needed, stream)
        if not context.execute_async_v3(handle):
            raise EngineError(f"{self.name}: execute_async_v3 failed for shapes {dict(key)}")
        reference = {name: tensor.clone() for name, tensor in binding.outputs.items()}
        shapes = {n: tuple(t.shape) for n, t in feeds.items()}
        try:
            graph = self._graphs.capture(context.execute_async_v3, stream)
        except RuntimeError as exc:  # CUDA refused the capture (an uncapturable call inside the enqueue)
            self._give_up_graph(binding, reference, f"CUDA graph capture failed for {shapes} ({exc})")
            return
        if graph is None:
            self._give_up_graph(binding, reference, f"TensorRT cannot capture the enqueue for {shapes} "
                                                    "(execute_async_v3 returned False during capture)")
            return
        for tensor in binding.outputs.values():  # an empty or stale graph must not pass for a good one
            if tensor.is_floating_point():
                tensor.fill_(math.nan)
        self._graphs.replay(graph, stream)
        if not outputs_match(binding.outputs, reference):
            self._give_up_graph(binding, reference, f"the first replay of the graph for {shapes} differs "
                                                    "from an uncaptured run")
            return
        binding.graph, binding.graph_generation = graph, self.arena.generation

    def _give_up_graph(self, binding: _Binding, reference: Mapping[str, torch.Tensor], why: str) -> None:
        """Never keep a doubtful graph: run this shape uncaptured from now on; this call's outputs are
        the uncaptured run's."""
        log.warning("%s: %s; running this shape without a CUDA graph", self.name, why)
        binding.graph, binding.graph_failed = None, True
        for name, tensor in binding.outputs.items():
            tensor.copy_(reference[name])

    def synchronize(self) -> None:
        """Wait for the work this engine enqueued last (before its contexts or buffers go)."""
        if self._last_stream is not None:
            self._last_stream.synchronize()

    def close(self) -> None:
        """Wait for the last enqueue, then drop contexts before the engine, the engine before the runtime
        (TensorRT's order)."""
        self.synchronize()
        self._bindings.clear()
        self._contexts.clear()
        self._context_state.clear()
        self.engine = None
        self._runtime = None

    def __repr__(self) -> str:
        return f"Engine({self.name!r}, profiles={len(self.profile_ranges)}, device={self.device})"

