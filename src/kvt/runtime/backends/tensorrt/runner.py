"""The engine runner: one deserialized plan, its execution contexts, buffers and execution.

Execution uses TensorRT's name-based tensor API on torch CUDA tensors: ``set_input_shape`` and
``set_tensor_address`` per call, then ``execute_async_v3`` on a CUDA stream. Nothing inside a call
waits for the GPU or copies through the host: output shapes come from the stage table (checked against
TensorRT's once per shape), inputs are used in place when they already are contiguous CUDA tensors of
the engine's dtype.

Memory: contexts are created with USER_MANAGED activation memory and all engines of a backend share one
:class:`ActivationArena` (the stages run one after another on one stream, so one buffer sized for the
largest engine serves them all). Output buffers are kept per shape and reused (``reuse_outputs``); a
caller that keeps an output past the next call with the same shape must clone it.

Engines with several optimisation profiles (the interpolation U-Net) get one context per profile; a
call picks the profile whose ranges contain its shapes and whose opt shapes are nearest.

CUDA graphs (``cuda_graphs=True``): the first call of a shape runs normally (TensorRT finishes its
lazy setup), the second captures ``execute_async_v3`` into a graph over static input/output buffers,
later calls copy inputs in and replay. A shape whose capture fails runs uncaptured from then on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from kvt.contract.dtypes import DType
from kvt.contract.errors import KvtError
from kvt.contract.stages import StageSpec
from kvt.runtime.backends.tensorrt.trt_env import import_tensorrt, make_logger

log = logging.getLogger(__name__)

ShapeKey = tuple[tuple[str, tuple[int, ...]], ...]
# (min, opt, max) shape of one input in one optimisation profile
ProfileRange = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


class EngineError(KvtError, RuntimeError):
    """A plan cannot be loaded or does not match the stage it is meant to run."""


def torch_dtype(trt_type: Any) -> torch.dtype:
    """torch dtype of a TensorRT DataType (by enum member name, so a fake library works too)."""
    try:
        return DType.of_tensorrt(trt_type).torch
    except TypeError:
        raise EngineError(f"TensorRT data type {trt_type} has no torch equivalent here") from None


class ActivationArena:
    """One device buffer for the activations of engines that run in turn (grown, never shrunk)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffer: torch.Tensor | None = None
        self.generation = 0  # bumped on every reallocation: captured graphs of older ones are stale

    @property
    def nbytes(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel()

    def reserve(self, nbytes: int) -> None:
        if nbytes > self.nbytes:
            self._buffer = None  # free first: the old and new buffers need not coexist
            self._buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self.generation += 1

    def pointer(self) -> int:
        return 0 if self._buffer is None else self._buffer.data_ptr()


@dataclass
class _Binding:
    """Everything prepared for one input-shape combination."""

    profile: int
    outputs: dict[str, torch.Tensor]
    calls: int = 0
    graph: Any = None  # torch.cuda.CUDAGraph
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


class Engine:
    """A TensorRT plan ready to run one stage on CUDA tensors."""

    def __init__(self, plan: bytes, spec: StageSpec, device: torch.device | str = "cuda", *,
                 arena: ActivationArena | None = None, reuse_outputs: bool = True,
                 cuda_graphs: bool = False, trt: ModuleType | None = None, name: str = "") -> None:
        self.trt = trt or import_tensorrt()
        self.spec = spec
        self.device = torch.device(device)
        self.name = name or spec.name
        self.reuse_outputs = reuse_outputs or cuda_graphs
        self.cuda_graphs = cuda_graphs
        self.arena = arena if arena is not None else ActivationArena(self.device)
        self._bindings: dict[ShapeKey, _Binding] = {}
        self._contexts: dict[Any, Any] = {}
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
        self.arena.reserve(int(self.engine.device_memory_size_v2))

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
                context.set_optimization_profile_async(profile, stream_handle)
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
        outputs = {t.name: torch.empty(t.concrete_shape(dims), dtype=t.dtype.torch, device=self.device)
                   for t in self.spec.outputs}
        binding = _Binding(profile, outputs)
        if self.reuse_outputs:
            self._bindings[key] = binding
        return binding

    def _set_shapes(self, context: Any, inputs: Mapping[str, torch.Tensor], binding: _Binding) -> None:
        for name, tensor in inputs.items():
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise EngineError(f"{self.name}: TensorRT refused shape {tuple(tensor.shape)} for {name!r}")
        if binding.calls == 0:  # once per shape: the contract's output shapes are TensorRT's
            for name, out in binding.outputs.items():
                got = tuple(context.get_tensor_shape(name))
                if got != tuple(out.shape):
                    raise EngineError(f"{self.name}: TensorRT computes output {name!r} as {got}, the stage "
                                      f"table says {tuple(out.shape)}")

    def _bind(self, context: Any, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
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
            out[tensor.name] = value.contiguous()
        return out

    # -------------------------------------------------------------- execution

    def __call__(self, inputs: Mapping[str, torch.Tensor], stream: torch.cuda.Stream | None = None) -> dict[str, torch.Tensor]:
        """Run on ``stream`` (default: torch's current stream); outputs are ready in stream order.

        A CPU ``device`` is accepted only so that unit tests can drive a fake of the library (stream 0).
        """
        on_cuda = self.device.type == "cuda"
        run_stream = (stream or torch.cuda.current_stream(self.device)) if on_cuda else None  # None iff not on_cuda
        handle = run_stream.cuda_stream if run_stream is not None else 0
        feeds = self._prepare_inputs(inputs)
        key: ShapeKey = tuple((name, tuple(t.shape)) for name, t in feeds.items())
        binding = self._binding(key, feeds)
        context = self._context(binding.profile, handle, key)
        if run_stream is not None and self.cuda_graphs and not binding.graph_failed and binding.calls >= 1:
            self._run_graph(context, feeds, binding, run_stream)
        else:
            self._set_shapes(context, feeds, binding)
            self._bind(context, feeds, binding.outputs)
            if not context.execute_async_v3(handle):
                raise EngineError(f"{self.name}: execute_async_v3 failed for shapes {dict(key)}")
        binding.calls += 1
        if run_stream is not None:
            for tensor in feeds.values():
                tensor.record_stream(run_stream)  # the caller may free inputs before the stream has read them
        return dict(binding.outputs)

    def _run_graph(self, context: Any, feeds: Mapping[str, torch.Tensor], binding: _Binding,
                   stream: torch.cuda.Stream) -> None:
        if not binding.static_inputs:
            binding.static_inputs = {n: torch.empty_like(t) for n, t in feeds.items()}
        for name, tensor in feeds.items():
            binding.static_inputs[name].copy_(tensor)
        if binding.graph is None or binding.graph_generation != self.arena.generation:
            self._set_shapes(context, binding.static_inputs, binding)
            self._bind(context, binding.static_inputs, binding.outputs)
            try:
                graph = torch.cuda.CUDAGraph()
                capture = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]  # unannotated in torch
                capture.wait_stream(stream)
                with torch.cuda.graph(graph, stream=capture):
                    context.execute_async_v3(capture.cuda_stream)
                stream.wait_stream(capture)
            except RuntimeError as exc:  # layers TensorRT cannot capture, or CUDA refusing the capture
                log.warning("%s: CUDA graph capture failed for %s (%s); running uncaptured",
                            self.name, {n: tuple(t.shape) for n, t in feeds.items()}, exc)
                binding.graph_failed = True
                if not context.execute_async_v3(stream.cuda_stream):
                    raise EngineError(f"{self.name}: execute_async_v3 failed") from None
                return
            binding.graph, binding.graph_generation = graph, self.arena.generation
        with torch.cuda.stream(stream):
            binding.graph.replay()

    def close(self) -> None:
        """Drop contexts before the engine, the engine before the runtime (TensorRT's order)."""
        self._bindings.clear()
        self._contexts.clear()
        self.engine = None
        self._runtime = None

    def __repr__(self) -> str:
        return f"Engine({self.name!r}, profiles={len(self.profile_ranges)}, device={self.device})"

