"""The BF16 text encoder: an export's FP32 T5 graph rewritten so its TensorRT plan holds BF16 weights.

The export keeps the text encoder in FP32 (T5 activations overflow FP16; ONNX Runtime on the CPU, which
checks every export's parity, has few BF16 kernels). As an FP32 plan the Flan-UL2 encoder alone is
about 35 GB of weights, which with the U-Nets does not fit an 80 GB GPU. Plans are built strongly typed
(the graph's types are the plan's), so the precision is chosen in the graph: this module rewrites a
copy of it, before TensorRT parses it, with

* every FP32 weight that feeds a GEMM (MatMul / Gemm weight operands, directly or through a Transpose:
  torch's exporter writes ``Linear`` as ``MatMul(x, Transpose(W))``) or an embedding lookup (Gather
  tables) stored as BF16 (round to nearest even), so those GEMMs and lookups run in BF16 (BF16 has
  FP32's exponent range: no overflow);
* a Cast to BF16 on the activation operand of those GEMMs and a Cast back to FP32 on their outputs, so
  everything else (the RMS norms, softmax, residual adds, position bias, the projection's LayerNorm and
  the zeroing of padded rows) keeps computing in FP32 exactly as exported.

Weights are streamed one tensor at a time from the export's external data into the copy's own data
file: host memory stays at one tensor however large the model. ``kvt build --text-encoder-precision
fp32`` builds the exported FP32 graph instead.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper

from kvt.contract.errors import KvtError

log = logging.getLogger(__name__)

# op -> index of the operand that is a weight when it is an FP32 initializer
WEIGHT_OPERANDS: dict[str, int] = {"MatMul": 1, "Gemm": 1, "Gather": 0}
EXTERNAL_DATA_BYTES = 1 << 30  # write external data above this size (protobuf's 2 GB limit)


class PrecisionRewriteError(KvtError, RuntimeError):
    """A graph could not be rewritten for a lower-precision plan."""


@dataclass(frozen=True)
class RewriteResult:
    path: Path
    converted: int  # initializers stored as BF16
    bytes_before: int  # weight bytes of the source graph
    bytes_after: int
    casts: int  # Cast nodes added


def to_bf16_bits(array: np.ndarray) -> np.ndarray:
    """FP32 -> BF16 bit patterns (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return rounded.astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """BF16 bit patterns (uint16) -> FP32 values (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _external(tensor: TensorProto) -> dict[str, str] | None:
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    return {entry.key: entry.value for entry in tensor.external_data}


def _raw_bytes(tensor: TensorProto, base: Path) -> bytes:
    """The tensor's data as raw little-endian bytes (external, raw_data or typed fields)."""
    info = _external(tensor)
    if info is not None:
        with open(base / info["location"], "rb") as handle:
            handle.seek(int(info.get("offset", 0)))
            length = info.get("length")
            return handle.read(int(length)) if length is not None else handle.read()
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return onnx.numpy_helper.to_array(tensor).tobytes()


def _weight_initializers(model: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """FP32 initializers of rank >= 2 used only as the weight operand of MatMul / Gemm / Gather, directly
    or through Transposes whose outputs are used only as a MatMul / Gemm weight; and those Transposes'
    outputs (BF16 values once their input is)."""
    initializers = {t.name: t for t in model.graph.initializer}
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            uses.setdefault(name, []).append((node, position))

    def weight_use(node: onnx.NodeProto, position: int) -> bool:
        return WEIGHT_OPERANDS.get(node.op_type) == position

    chosen: set[str] = set()
    transposed: set[str] = set()
    for name, tensor in initializers.items():
        if tensor.data_type != TensorProto.FLOAT or len(tensor.dims) < 2:
            continue
        used = uses.get(name, [])
        through = [node.output[0] for node, position in used if node.op_type == "Transpose" and position == 0]
        direct = all(weight_use(node, position) or (node.op_type == "Transpose" and position == 0)
                      for node, position in used)
        via_transpose = all(uses.get(out) and all(weight_use(n, p) and n.op_type != "Gather"
                                                  for n, p in uses[out]) for out in through)
        if used and direct and via_transpose:
            chosen.add(name)
            transposed.update(through)
    return chosen, transposed


def _rewrite_nodes(model: onnx.ModelProto, bf16: set[str]) -> int:
    """Casts around the nodes whose weight operand became BF16; returns how many Casts were added."""
    nodes: list[onnx.NodeProto] = []
    casts = 0
    for node in model.graph.node:
        position = WEIGHT_OPERANDS.get(node.op_type)
        if position is None or position >= len(node.input) or node.input[position] not in bf16:
            nodes.append(node)
            continue
        for index, name in enumerate(list(node.input)):
            if index == position or not name or (node.op_type == "Gather" and index == 1):
                continue  # the weight itself; Gather's indices stay integers
            if name in bf16:
                continue
            cast_out = f"{name}__bf16_for_{node.name or node.output[0]}"
            nodes.append(helper.make_node("Cast", [name], [cast_out], to=TensorProto.BFLOAT16,
                                          name=f"{node.name or node.output[0]}/cast_in{index}_bf16"))
            node.input[index] = cast_out
            casts += 1
        original = node.output[0]
        low = f"{original}__bf16"
        node.output[0] = low
        nodes.append(node)
        nodes.append(helper.make_node("Cast", [low], [original], to=TensorProto.FLOAT,
                                      name=f"{node.name or original}/cast_out_fp32"))
        casts += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return casts


def rewrite_bf16_weights(source: str | Path, target: str | Path) -> RewriteResult:
    """Write ``target`` (and ``target``.data when large): the graph at ``source`` with GEMM and
    embedding weights in BF16 (see the module docstring). ``source``'s external data is read beside it."""
    source, target = Path(source), Path(target)
    model = onnx.load(str(source), load_external_data=False)
    base = source.parent
    bf16, transposed = _weight_initializers(model)
    if not bf16:
        raise PrecisionRewriteError(f"{source}: no FP32 GEMM or embedding weights to store as BF16")
    casts = _rewrite_nodes(model, bf16 | transposed)
    # The exporter's recorded types say FP32 for the weights and their transposes, and know nothing of the
    # new Casts' outputs: drop them all (ONNX shape inference and TensorRT's parser infer them again).
    del model.graph.value_info[:]
    total = sum(_nbytes(t) for t in model.graph.initializer)
    data_name = f"{target.name}.data"
    external = total > EXTERNAL_DATA_BYTES
    target.parent.mkdir(parents=True, exist_ok=True)
    before = after = 0
    with _maybe_open(target.parent / data_name if external else None) as data_file:
        for tensor in model.graph.initializer:
            raw = _raw_bytes(tensor, base)
            before += len(raw)
            if tensor.name in bf16:
                raw = to_bf16_bits(np.frombuffer(raw, dtype="<f4")).tobytes()
                tensor.data_type = TensorProto.BFLOAT16
            after += len(raw)
            _set_data(tensor, raw, data_file, data_name)
    onnx.save(model, str(target))
    onnx.checker.check_model(str(target))
    log.info("%s: %d weights as BF16 (%.2f -> %.2f GB), %d casts", target.name, len(bf16), before / 1e9,
             after / 1e9, casts)
    return RewriteResult(target, len(bf16), before, after, casts)


def _nbytes(tensor: TensorProto) -> int:
    info = _external(tensor)
    if info is not None and "length" in info:
        return int(info["length"])
    count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    return count * max(1, onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize)


class _DataFile:
    """The copy's external data file and the next write offset."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.offset = 0


@contextlib.contextmanager
def _maybe_open(path: Path | None) -> Iterator[_DataFile | None]:
    if path is None:
        yield None
        return
    with open(path, "wb") as handle:
        yield _DataFile(handle)


def _set_data(tensor: TensorProto, raw: bytes, data_file: _DataFile | None, data_name: str) -> None:
    for name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(name)  # type: ignore[arg-type]  # protobuf field names
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    if data_file is None:
        tensor.data_location = TensorProto.DEFAULT
        tensor.raw_data = raw
        return
    pad = (-data_file.offset) % 64  # aligned offsets, as onnx's own external-data writer does
    data_file.handle.write(b"\0" * pad)
    data_file.offset += pad
    data_file.handle.write(raw)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", data_name), ("offset", str(data_file.offset)), ("length", str(len(raw)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    data_file.offset += len(raw)


def iter_bf16_initializers(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, FP32 values) of the BF16 initializers of a rewritten graph (for checks and tests)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.BFLOAT16:
            bits = np.frombuffer(_raw_bytes(tensor, path.parent), dtype="<u2")
            yield tensor.name, from_bf16_bits(bits).reshape(tuple(tensor.dims))
