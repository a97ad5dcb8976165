"""Every TensorRT name our code uses exists in the TensorRT API of the minimum supported version (10.12) and
of the newest stubs (10.13) (the ``tensorrt-stubs`` .pyi files), and has the release that introduced it.

The checker is :mod:`kvt.engines.api_check` (also ``python -m kvt.engines.api_check``); see its docstring
for how the stubs and our sources are read. These tests run it on kvt's sources, check that its
inference sees the calls that matter, and feed it deliberately misspelt usages to show it reports them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from kvt.engines.api_check import (
    INTRODUCED,
    StubIndex,
    check_kvt,
    check_usages,
    collect_usages,
    kvt_sources,
    main,
    stub_dir,
    stub_folder,
)
from kvt.runtime.backends.tensorrt.trt_env import MIN_TENSORRT_VERSION, version_tuple


@pytest.fixture(scope="module")
def stubs() -> StubIndex:
    index = StubIndex.load()
    if index is None:
        pytest.skip("tensorrt-stubs is not installed (`pip install --no-deps tensorrt-stubs==10.13.*`)")
    return index


def test_stub_index_reads_the_api(stubs):
    assert stubs.member("IExecutionContext", "execute_async_v3") == ("method", "bool")
    assert stubs.member("Builder", "create_network")[1] == "INetworkDefinition"
    assert stubs.member("Logger", "log") is not None  # inherited from ILogger
    assert stubs.member("ILogger.Severity", "ERROR") == ("value", "ILogger.Severity")
    assert "__version__" in stubs.module_names and "Builder" in stubs.module_names


def test_every_tensorrt_name_we_use_exists(stubs):
    usages, problems = check_kvt(stubs)  # the sources, and the DataType names of the contract's type table
    assert not problems, "\n".join(problems)
    used = {u.qualified for u in usages}
    # The inference must see the calls that matter; if it lost track of a variable, this fails
    # instead of passing vacuously.
    expected = {
        "Builder", "Logger" if "Logger" in used else "ILogger", "OnnxParser", "Runtime",
        "NetworkDefinitionCreationFlag.STRONGLY_TYPED", "Builder.create_network",
        "Builder.create_builder_config", "Builder.create_optimization_profile",
        "Builder.build_serialized_network", "OnnxParser.parse_from_file", "OnnxParser.num_errors",
        "OnnxParser.get_error", "ParserError.node_name", "ParserError.node_operator", "ParserError.desc",
        "IBuilderConfig.builder_optimization_level", "IBuilderConfig.set_memory_pool_limit",
        "MemoryPoolType.WORKSPACE", "IBuilderConfig.create_timing_cache", "IBuilderConfig.set_timing_cache",
        "IBuilderConfig.get_timing_cache", "ITimingCache.serialize", "IBuilderConfig.add_optimization_profile",
        "IOptimizationProfile.set_shape", "INetworkDefinition.num_inputs", "INetworkDefinition.get_input",
        "Runtime.deserialize_cuda_engine", "ICudaEngine.num_io_tensors", "ICudaEngine.get_tensor_name",
        "ICudaEngine.get_tensor_mode", "ICudaEngine.get_tensor_dtype", "TensorIOMode.INPUT",
        "ICudaEngine.get_tensor_profile_shape", "ICudaEngine.num_optimization_profiles",
        "ICudaEngine.device_memory_size_v2", "ICudaEngine.create_execution_context",
        "ExecutionContextAllocationStrategy.USER_MANAGED", "IExecutionContext.set_optimization_profile_async",
        "IExecutionContext.set_input_shape", "IExecutionContext.get_tensor_shape",
        "IExecutionContext.set_tensor_address", "IExecutionContext.set_device_memory",
        "IExecutionContext.execute_async_v3", "DataType.FLOAT", "DataType.HALF", "DataType.BOOL",
        "ILogger.Severity", "__version__",
    }
    assert expected <= used, f"not seen by the checker: {sorted(expected - used)}"


BROKEN = '''
import tensorrt as trt

def build(logger):
    builder = trt.Builder(logger)
    network = builder.create_netwrk(0)                      # misspelt method
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP17)                   # misspelt enum value
    config.set_flag(trt.BuilderFlag.FP16)                   # removed in TensorRT 11
    engine = trt.Runtime(logger).deserialize_cuda_engine(b"")
    size = engine.device_memory_size                        # removed in TensorRT 11
    context = engine.create_execution_context()
    context.execute_async_v4(0)                             # does not exist
    trt.OnnxParsr(network, logger)                          # misspelt class
    if hasattr(context, "set_future_thing"):                # guarded, allow-listed 11.x name
        context.set_future_thing()
    ok = context.set_input_shape("x", (1,))                 # fine
'''


def test_checker_reports_misspelt_and_removed_names(stubs):
    usages = collect_usages(stubs, {"broken.py": BROKEN})
    problems = check_usages(stubs, usages, allowed_11x={"IExecutionContext.set_future_thing": "test"})
    text = "\n".join(problems)
    for name in ("Builder.create_netwrk", "BuilderFlag.FP17", "IExecutionContext.execute_async_v4",
                 "OnnxParsr"):
        assert f"tensorrt {name} does not exist" in text, text
    for name in ("BuilderFlag.FP16", "ICudaEngine.device_memory_size"):
        assert f"tensorrt {name} was removed in TensorRT 11" in text, text
    # the guarded hasattr is allowed; the unguarded call of the same name is not
    assert sum("set_future_thing" in p for p in problems) == 1
    assert "allow-listed 11.x name used without a hasattr/getattr guard" in text
    assert not any("set_input_shape" in p for p in problems)
    assert len(problems) == 7, text


def test_sources_are_the_engine_and_tensorrt_backend_modules():
    files = set(kvt_sources())
    assert {"kvt/engines/builder.py", "kvt/engines/doctor.py", "kvt/runtime/backends/tensorrt/runner.py",
            "kvt/runtime/backends/tensorrt/trt_env.py", "kvt/runtime/backends/tensorrt/backend.py"} <= files
    assert not any(f.startswith("tests/") for f in files)


def test_command_line(stubs, tmp_path, capsys):
    assert main([]) == 0
    assert "0 problem(s)" in capsys.readouterr().err
    assert main(["--stubs", str(tmp_path)]) == 2
    assert "no tensorrt.pyi" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- several versions

REPO = Path(__file__).resolve().parents[1]


def _minimum_stubs() -> StubIndex | None:
    """The stubs of the minimum supported TensorRT: $KVT_TENSORRT_STUBS_MIN or the README's
    ``.venv/tensorrt-stubs-10.12`` (a ``pip install --target`` folder)."""
    folder = Path(os.environ.get("KVT_TENSORRT_STUBS_MIN", REPO / ".venv" / "tensorrt-stubs-10.12"))
    return StubIndex.load(stub_folder(folder))


def test_every_name_exists_in_the_minimum_supported_tensorrt(stubs):
    minimum = _minimum_stubs()
    if minimum is None:
        pytest.skip("no stubs of the minimum TensorRT: `pip install --no-deps --target .venv/tensorrt-stubs-10.12 "
                    "tensorrt-stubs==10.12.0.36.1` (or set KVT_TENSORRT_STUBS_MIN)")
    assert minimum.version.startswith(MIN_TENSORRT_VERSION + ".")
    usages, problems = check_kvt(minimum)
    assert not problems, "\n".join(problems)
    assert main(["--stubs", str(stub_folder(REPO / ".venv" / "tensorrt-stubs-10.12")), "--stubs",
                 str(stub_dir())]) == 0 or "KVT_TENSORRT_STUBS_MIN" in os.environ


def test_an_older_api_is_caught(stubs, tmp_path):
    """Stubs without the 10.1 names (as TensorRT 10.0's bindings are) make the check fail, naming them."""
    source = stub_dir()
    text = (source / "tensorrt.pyi").read_text()
    for name in ("device_memory_size_v2", "set_device_memory"):
        text = re.sub(rf"\n( +)def {name}\(.*?\n(?=\1(?:def |@)|\S)", "\n", text, flags=re.S)
    folder = tmp_path / "tensorrt_bindings"
    folder.mkdir()
    (folder / "tensorrt.pyi").write_text(text)
    (folder / "__init__.pyi").write_text((source / "__init__.pyi").read_text().replace("10.13.0.35", "10.0.1.6"))
    old = StubIndex.load(folder)
    assert old is not None and old.version == "10.0.1.6"
    problems = check_kvt(old)[1]
    text = "\n".join(problems)
    assert "tensorrt ICudaEngine.device_memory_size_v2 does not exist in TensorRT 10.0.1.6" in text
    assert "tensorrt IExecutionContext.set_device_memory does not exist in TensorRT 10.0.1.6" in text
    assert main(["--stubs", str(tmp_path)]) == 1


def test_every_name_has_the_release_that_introduced_it_in_the_docs(stubs):
    usages, _ = check_kvt(stubs)
    used = {u.qualified for u in usages}
    assert used <= set(INTRODUCED), f"no INTRODUCED entry: {sorted(used - set(INTRODUCED))}"
    stale = set(INTRODUCED) - used
    assert not stale, f"INTRODUCED lists names the code no longer uses: {sorted(stale)}"
    assert all(version_tuple(v) <= version_tuple(MIN_TENSORRT_VERSION) for v in INTRODUCED.values())
    docs = (REPO / "docs" / "TENSORRT.md").read_text()
    for name, version in INTRODUCED.items():
        short = name.rsplit(".", 1)[-1]
        assert f"`{name}`" in docs or f"`{short}`" in docs, f"docs/TENSORRT.md does not list {name}"
        assert f"| {version} |" in docs
