"""A stand-in for the ``tensorrt`` module: just the API kvt's builder and engine runner call.

It records what it is asked (builds, network flags, the timing cache it was given) and returns plans
that are JSON descriptions of the build request instead of engines; the runner reads them back. Tests
set its class attributes (``fail_parse``, ``fail_build``, ``output_shape``, ``reject_timing_cache``,
``refuse_capture``) to steer it and reset them with monkeypatch (see the ``fake_trt`` fixture of
tests/test_engines.py).

Where the real library can fail, the fake can too: ``create_timing_cache`` returns None for a rejected
blob, ``set_optimization_profile_async`` raises RuntimeError for a profile the plan lacks (as the
binding does), and ``execute_async_v3`` returns False inside a CUDA-graph capture when
``refuse_capture`` is set (TensorRT's way of saying "not capturable"). Outside a capture, an execution
really writes the outputs of a CPU run: every float output is filled with a value computed from the
first input (its sum), so a replay that did not run is visible.
"""

from __future__ import annotations

import ctypes
import enum
import json
import math

import numpy as np
import onnx

_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "BF16": np.uint16, "INT32": np.int32, "INT64": np.int64,
          "BOOL": np.bool_, "INT8": np.int8, "UINT8": np.uint8}


def host_array(pointer: int, shape, dtype_name: str) -> np.ndarray:
    """A numpy view of CPU memory at ``pointer`` (the fake runs on the CPU tensors of the runner tests)."""
    dtype = np.dtype(_NUMPY[dtype_name])
    count = math.prod(shape)
    buffer = (ctypes.c_byte * (count * dtype.itemsize)).from_address(pointer)
    return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)


class _Enum(enum.Enum):
    pass


class FakeTensorRT:
    """A stand-in for the ``tensorrt`` module (and nothing else): just the API the builder and the
    runner call, recording what it was asked. Plans are JSON descriptions of the build request."""

    __version__ = "10.13.0.35"
    builds = 0
    fail_parse: list[tuple[int, str, str, str]] = []  # (node index, name, operator, description)
    fail_build = False
    last_flags: int | None = None
    last_timing_cache: bytes | None = None
    last_config = None
    reject_timing_cache = False  # create_timing_cache(non-empty blob) returns None (a foreign or damaged cache)
    refuse_capture = False  # execute_async_v3 returns False while a graph is being captured
    capturing = False  # set by the test's graph-capture stand-in
    executions = 0  # executions that ran (not captured)

    DataType = _Enum("DataType", "FLOAT HALF BF16 INT32 INT64 BOOL INT8 UINT8")
    MemoryPoolType = _Enum("MemoryPoolType", "WORKSPACE")
    TensorIOMode = _Enum("TensorIOMode", "NONE INPUT OUTPUT")
    PreviewFeature = _Enum("PreviewFeature", "PROFILE_SHARING_0806 ALIASED_PLUGIN_IO_10_03 RUNTIME_ACTIVATION_RESIZE_10_10")
    HardwareCompatibilityLevel = _Enum("HardwareCompatibilityLevel", "NONE AMPERE_PLUS SAME_COMPUTE_CAPABILITY")

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1

    class ILogger:
        Severity = _Enum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE")

        def __init__(self) -> None:
            pass

    class _Tensor:
        def __init__(self, name, dtype, rank):
            self.name, self.dtype, self.shape = name, dtype, (-1,) * rank

    class _Network:
        def __init__(self, flags):
            self.flags, self.inputs, self.outputs = flags, [], []
            FakeTensorRT.last_flags = flags

        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))

        def get_input(self, i):
            return self.inputs[i]

        def get_output(self, i):
            return self.outputs[i]

    class _ParserError:
        def __init__(self, node, name, op, desc):
            self._v = (node, name, op, desc)

        def node(self):
            return self._v[0]

        def node_name(self):
            return self._v[1]

        def node_operator(self):
            return self._v[2]

        def desc(self):
            return self._v[3]

        def code(self):
            return "ErrorCode.UNSUPPORTED_NODE"

    class OnnxParser:
        _TYPES = {1: "FLOAT", 10: "HALF", 16: "BF16", 6: "INT32", 7: "INT64", 9: "BOOL"}

        def __init__(self, network, logger):
            self.network, self.errors = network, []

        def parse_from_file(self, path):
            if FakeTensorRT.fail_parse:
                self.errors = [FakeTensorRT._ParserError(*e) for e in FakeTensorRT.fail_parse]
                return False
            graph = onnx.load(path, load_external_data=False).graph
            for values, target in ((graph.input, self.network.inputs), (graph.output, self.network.outputs)):
                for value in values:
                    kind = value.type.tensor_type
                    target.append(FakeTensorRT._Tensor(value.name, getattr(FakeTensorRT.DataType, self._TYPES[kind.elem_type]),
                                                       len(kind.shape.dim)))
            return True

        num_errors = property(lambda self: len(self.errors))

        def get_error(self, i):
            return self.errors[i]

    class _Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            self.shapes[name] = [list(low), list(opt), list(high)]

    class _TimingCache:
        def __init__(self, data):
            self.data = bytes(data) + b"+"

        def serialize(self):
            return self.data

    class _Config:  # no set_flag: a precision flag would fail the build
        def __init__(self):
            self.builder_optimization_level = None
            self.hardware_compatibility_level = FakeTensorRT.HardwareCompatibilityLevel.NONE
            self.pools, self.profiles, self.cache, self.preview = {}, [], None, {}
            FakeTensorRT.last_config = self

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool.name] = size

        def set_preview_feature(self, feature, enable):
            self.preview[feature.name] = enable

        def create_timing_cache(self, data):
            FakeTensorRT.last_timing_cache = bytes(data)
            if data and FakeTensorRT.reject_timing_cache:
                return None
            return FakeTensorRT._TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            self.profiles.append(profile.shapes)

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            return FakeTensorRT._Network(flags)

        def create_builder_config(self):
            return FakeTensorRT._Config()

        def create_optimization_profile(self):
            return FakeTensorRT._Profile()

        def build_serialized_network(self, network, config):
            if FakeTensorRT.fail_build:
                self.logger.log(FakeTensorRT.ILogger.Severity.ERROR, "out of fake memory")
                return None
            FakeTensorRT.builds += 1
            io = [[t.name, True, t.dtype.name] for t in network.inputs]
            io += [[t.name, False, t.dtype.name] for t in network.outputs]
            return json.dumps({"inputs": [t.name for t in network.inputs], "io": io, "profiles": config.profiles,
                               "level": config.builder_optimization_level, "pools": config.pools,
                               "preview": config.preview,
                               "hardware": config.hardware_compatibility_level.name}).encode()


    class _Context:
        def __init__(self, engine, strategy):
            self.engine, self.strategy, self.calls, self.shapes = engine, strategy, [], {}
            self.addresses = {}
            self.profile = 0

        def set_optimization_profile_async(self, index, stream):
            if not 0 <= index < len(self.engine.ranges):
                raise RuntimeError(f"profile index {index} is out of range")  # the binding raises
            self.calls.append(("profile", index))
            self.profile = index
            return True

        def set_input_shape(self, name, shape):
            self.calls.append(("shape", name, tuple(shape)))
            self.shapes[name] = tuple(shape)
            return True

        def update_device_memory_size_for_shapes(self):
            return 4096 + sum(math.prod(shape) for shape in self.shapes.values())

        def get_tensor_shape(self, name):
            return FakeTensorRT.output_shape(name, self.shapes)  # the real library infers it

        def set_tensor_address(self, name, pointer):
            self.calls.append(("address", name, pointer))
            self.addresses[name] = pointer

        def set_device_memory(self, pointer, size):
            self.calls.append(("memory", pointer, size))

        def execute_async_v3(self, stream):
            if FakeTensorRT.capturing:
                self.calls.append(("capture", stream))
                return not FakeTensorRT.refuse_capture
            self.calls.append(("execute", stream))
            FakeTensorRT.executions += 1
            self._compute()
            return True

        def _compute(self):
            """Float outputs := 1 + sum of the first input (only when every tensor has an address)."""
            io = {name: (is_input, dtype) for name, is_input, dtype in self.engine.io}
            inputs = [name for name, (is_input, _) in io.items() if is_input]
            if not inputs or any(name not in self.addresses for name in io) or FakeTensorRT.output_shape is None:
                return
            first = inputs[0]
            value = 1.0 + float(host_array(self.addresses[first], self.shapes[first], io[first][1]).astype(np.float64).sum())
            for name, (is_input, dtype) in io.items():
                if not is_input and dtype in ("FLOAT", "HALF"):
                    host_array(self.addresses[name], tuple(self.get_tensor_shape(name)), dtype)[...] = value

    output_shape = None  # set by runner tests: (output name, input shapes) -> shape

    class _Engine:
        def __init__(self, plan):
            data = json.loads(bytes(plan))
            self.io, self.ranges = data["io"], data["profiles"]
            self.contexts = []

        num_io_tensors = property(lambda self: len(self.io))
        num_optimization_profiles = property(lambda self: len(self.ranges))
        device_memory_size_v2 = property(lambda self: 4096)

        def get_tensor_name(self, i):
            return self.io[i][0]

        def get_tensor_mode(self, name):
            is_input = next(entry[1] for entry in self.io if entry[0] == name)
            return FakeTensorRT.TensorIOMode.INPUT if is_input else FakeTensorRT.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return getattr(FakeTensorRT.DataType, next(entry[2] for entry in self.io if entry[0] == name))

        def get_tensor_profile_shape(self, name, index):
            return self.ranges[index][name]

        def create_execution_context(self, strategy):
            context = FakeTensorRT._Context(self, strategy)
            self.contexts.append(context)
            return context

    ExecutionContextAllocationStrategy = _Enum("ExecutionContextAllocationStrategy", "STATIC ON_PROFILE_CHANGE USER_MANAGED")

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, plan):
            try:
                return FakeTensorRT._Engine(plan)
            except ValueError:
                self.logger.log(FakeTensorRT.ILogger.Severity.ERROR, "magic tag mismatch")
                return None
