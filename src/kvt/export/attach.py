"""Turn a cleaned graph's weight inputs into initializers, streamed one tensor at a time.

Each weight becomes an ``onnx_ir.LazyTensor`` that reads (or generates) its tensor only when the file is
written, and ``onnx_ir.save`` writes external data in bounded chunks: peak memory is a few tensors, not
the model. Models whose weights exceed ``EXTERNAL_DATA_BYTES`` keep them in ``<stage>.onnx.data``
(protobuf cannot hold more than 2 GB).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvt.contract.dtypes import DType
from kvt.export.graph_export import WEIGHT_PREFIX, ExportError

EXTERNAL_DATA_BYTES = 1 << 30  # 1 GiB: well under protobuf's 2 GB limit

# Weight dtypes a graph may declare (ONNX names); everything else is refused.
_WEIGHT_DTYPES = frozenset({DType.FP32, DType.FP16, DType.INT64, DType.INT32})


def attach_weights(graph_path: Path, out_path: Path, tensors: Callable[[str], torch.Tensor],
                   stage_inputs: tuple[str, ...]) -> str | None:
    """Write ``out_path`` = the graph at ``graph_path`` with weights from ``tensors`` (by parameter name).

    Weights are cast to the dtype the graph declares for them. Returns the external data file name,
    or None when the weights are stored inside the model file.
    """
    import onnx_ir as ir

    model = ir.load(str(graph_path))
    graph = model.graph
    total = 0
    for value in [v for v in graph.inputs if v.name not in stage_inputs]:
        name = value.name
        assert name is not None  # the exporter names every graph input
        if not name.startswith(WEIGHT_PREFIX):
            raise ExportError(f"{graph_path}: graph input {value.name!r} is neither a stage input nor a weight")
        value_dtype = value.dtype
        assert value_dtype is not None and value.shape is not None  # the exporter types every graph input
        dtype_name = value_dtype.name
        dtype = DType.of_onnx(dtype_name) if dtype_name in {d.onnx for d in _WEIGHT_DTYPES} else None
        if dtype is None:
            raise ExportError(f"{graph_path}: weight {value.name} has unsupported dtype {dtype_name}")
        shape = value.shape.numpy()  # weights are static: ints only
        parameter = name[len(WEIGHT_PREFIX):]
        value.const_value = ir.LazyTensor(
            _loader(tensors, parameter, dtype, shape), dtype=value_dtype,
            shape=ir.Shape(shape), name=value.name)
        graph.inputs.remove(value)
        graph.register_initializer(value)
        total += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    external = f"{out_path.name}.data" if total > EXTERNAL_DATA_BYTES else None
    if external is None:
        ir.save(model, str(out_path))
    else:
        ir.save(model, str(out_path), external_data=external)
    return external


def _loader(tensors: Callable[[str], torch.Tensor], name: str, dtype: DType,
            shape: tuple[int, ...]) -> Callable[[], Any]:
    def load() -> Any:
        import onnx_ir as ir

        array = tensors(name).detach().to(device="cpu", dtype=dtype.torch).numpy()
        if array.shape != shape:
            raise ExportError(f"weight {name}: shape {array.shape} does not match the graph's {shape}")
        return ir.tensor(np.ascontiguousarray(array))

    return load
