"""Tensor element types and their names in every framework that reads the stage table.

One row per type: torch, numpy, ONNX (``TensorProto`` name), ONNX Runtime (``NodeArg.type``), TensorRT
(``DataType`` member name), Triton's ``config.pbtxt`` (``TYPE_*``) and Triton's wire protocol (the
``datatype`` of a request tensor). Every conversion in the project goes through this table, so adding a
type, or finding out which name a framework uses, is one look here.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, NamedTuple, TypeAlias

import numpy as np
import torch

# ``torch`` is also the name of a DType property below, which shadows the module inside the class body.
_TorchDType: TypeAlias = torch.dtype


class _Names(NamedTuple):
    torch: torch.dtype | None
    numpy: Any  # a numpy scalar type, or None where numpy has none
    onnx: str
    tensorrt: str | None
    triton: str
    wire: str


_NAMES: dict[str, _Names] = {
    "float32": _Names(torch.float32, np.float32, "FLOAT", "FLOAT", "TYPE_FP32", "FP32"),
    "float16": _Names(torch.float16, np.float16, "FLOAT16", "HALF", "TYPE_FP16", "FP16"),
    "bfloat16": _Names(torch.bfloat16, None, "BFLOAT16", "BF16", "TYPE_BF16", "BF16"),
    "float64": _Names(torch.float64, np.float64, "DOUBLE", None, "TYPE_FP64", "FP64"),
    "int64": _Names(torch.int64, np.int64, "INT64", "INT64", "TYPE_INT64", "INT64"),
    "int32": _Names(torch.int32, np.int32, "INT32", "INT32", "TYPE_INT32", "INT32"),
    "int8": _Names(torch.int8, np.int8, "INT8", "INT8", "TYPE_INT8", "INT8"),
    "uint8": _Names(torch.uint8, np.uint8, "UINT8", "UINT8", "TYPE_UINT8", "UINT8"),
    "bool": _Names(torch.bool, np.bool_, "BOOL", "BOOL", "TYPE_BOOL", "BOOL"),
    "string": _Names(None, np.object_, "STRING", None, "TYPE_STRING", "BYTES"),
}

# ONNX Runtime spells its element types after ONNX's C names.
_ORT = {"FLOAT": "float", "FLOAT16": "float16", "BFLOAT16": "bfloat16", "DOUBLE": "double",
        "INT64": "int64", "INT32": "int32", "INT8": "int8", "UINT8": "uint8", "BOOL": "bool",
        "STRING": "string"}


class DType(str, Enum):
    """An element type; its value is the torch/numpy spelling."""

    FP32 = "float32"
    FP16 = "float16"
    BF16 = "bfloat16"
    FP64 = "float64"
    INT64 = "int64"
    INT32 = "int32"
    INT8 = "int8"
    UINT8 = "uint8"
    BOOL = "bool"
    STRING = "string"

    @property
    def _names(self) -> _Names:
        return _NAMES[self.value]

    @property
    def torch(self) -> torch.dtype:
        dtype = self._names.torch
        if dtype is None:
            raise TypeError(f"torch has no {self.value} dtype")
        return dtype

    @property
    def numpy(self) -> np.dtype[Any]:
        if self._names.numpy is None:
            raise TypeError(f"numpy has no {self.value} dtype")
        return np.dtype(self._names.numpy)

    @property
    def onnx(self) -> str:
        """``onnx.TensorProto`` data type name."""
        return self._names.onnx

    @property
    def ort(self) -> str:
        """ONNX Runtime's ``NodeArg.type`` string."""
        return f"tensor({_ORT[self._names.onnx]})"

    @property
    def tensorrt(self) -> str:
        """``tensorrt.DataType`` member name."""
        name = self._names.tensorrt
        if name is None:
            raise TypeError(f"TensorRT has no {self.value} data type")
        return name

    @property
    def triton(self) -> str:
        """``config.pbtxt`` data_type."""
        return self._names.triton

    @property
    def wire(self) -> str:
        """Triton's protocol datatype (tritonclient's ``InferInput`` datatype)."""
        return self._names.wire

    @property
    def itemsize(self) -> int:
        return self.torch.itemsize

    # ------------------------------------------------------------------ lookups from other spellings

    @classmethod
    def of_torch(cls, dtype: _TorchDType) -> DType:
        return _lookup(lambda names: names.torch == dtype, f"torch dtype {dtype}")

    @classmethod
    def of_numpy(cls, dtype: Any) -> DType:
        wanted = np.dtype(dtype)
        return _lookup(lambda names: names.numpy is not None and np.dtype(names.numpy) == wanted,
                       f"numpy dtype {wanted}")

    @classmethod
    def of_onnx(cls, name: str) -> DType:
        return _lookup(lambda names: names.onnx == name, f"ONNX data type {name}")

    @classmethod
    def of_tensorrt(cls, data_type: Any) -> DType:
        """From a ``tensorrt.DataType`` (by member name, so any object with ``.name`` works)."""
        name = getattr(data_type, "name", str(data_type).rsplit(".", 1)[-1])
        return _lookup(lambda names: names.tensorrt == name, f"TensorRT data type {name}")

    @classmethod
    def of_wire(cls, name: str) -> DType:
        return _lookup(lambda names: names.wire == name, f"Triton datatype {name}")


def _lookup(match: Any, what: str) -> DType:
    for member in DType:
        if match(member._names):
            return member
    raise TypeError(f"{what} has no kvt DType (known: {[m.value for m in DType]})")
