"""A stand-in for the ``tensorrt`` module: just the API kvt's builder and engine runner call.

It records what it is asked (builds, network flags, the timing cache it was given) and returns plans
that are JSON descriptions of the build request instead of engines; the runner reads them back. Tests
set its class attributes (``fail_parse``, ``fail_build``, ``output_shape``) to steer it and reset them
with monkeypatch (see the ``fake_trt`` fixture of tests/test_engines.py).
"""

from __future__ import annotations

import enum
import json

import onnx


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

    DataType = _Enum("DataType", "FLOAT HALF BF16 INT32 INT64 BOOL INT8 UINT8")
    MemoryPoolType = _Enum("MemoryPoolType", "WORKSPACE")
    TensorIOMode = _Enum("TensorIOMode", "NONE INPUT OUTPUT")

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
            self.pools, self.profiles, self.cache = {}, [], None

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool.name] = size

        def create_timing_cache(self, data):
            FakeTensorRT.last_timing_cache = bytes(data)
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
                               "level": config.builder_optimization_level, "pools": config.pools}).encode()


    class _Context:
        def __init__(self, engine, strategy):
            self.engine, self.strategy, self.calls, self.shapes = engine, strategy, [], {}

        def set_optimization_profile_async(self, index, stream):
            self.calls.append(("profile", index))
            self.profile = index
            return True

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            return FakeTensorRT.output_shape(name, self.shapes)  # the real library infers it

        def set_tensor_address(self, name, pointer):
            self.calls.append(("address", name, pointer))

        def set_device_memory(self, pointer, size):
            self.calls.append(("memory", pointer, size))

        def execute_async_v3(self, stream):
            self.calls.append(("execute", stream))
            return True

    output_shape = None  # set by runner tests: (output name, input shapes) -> shape

    class _Engine:
        def __init__(self, plan):
            data = json.loads(plan)
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
