"""Static checks that stand in for a GPU: what TensorRT's ONNX parser and builder would refuse, or
handle badly, found on the exported graphs without TensorRT.

1. ``support``: every node's op and data dtype is in the onnx-tensorrt support matrix of the minimum
   supported TensorRT (``data/onnx_tensorrt_support.json``, which names its sources and versions), and
   so are Resize's attributes; the graph's opset is in the matrix's range.
2. ``constants``: the operands TensorRT needs as build-time constants (the matrix's "must be an
   initializer" rows, and kvt's policy for convolution and normalization weights) are initializers.
3. ``attention``: every Softmax sits in the pattern TensorRT fuses into one attention kernel
   (NVIDIA's "Fused Attention": BMM1 -> optional add mask -> Softmax -> BMM2, the scale applied to Q/K
   before BMM1). A Cast, IsNaN/Where, scale or anything else in between is reported: the unfused form
   materialises the whole score matrix. FP32 attention keeps the pattern but is not expected to get a
   fused kernel (reported as such, not as a problem; the memory planner counts its score matrix).
4. ``refold``: one more constant fold, run as the exporter's clean-up runs it (weights as graph inputs,
   Polygraphy's folding), removes nothing: constant sub-graphs left in a graph would otherwise reach
   TensorRT's parser as computed operands.

Checks 1-3 read only the graph (``load_external_data=False``), so they are cheap at any model size;
check 4 needs Polygraphy and ONNX Runtime (the ``export`` extra).

    python -m kvt.engines.static_checks EXPORT_DIR [--stages a,b] [--no-refold]

prints one line per problem and the attention sites, and exits 1 when there are problems.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import onnx

from kvt.contract.errors import KvtError
from kvt.formats.export_dir import WEIGHT_PREFIX, ExportManifest

SUPPORT_FILE = Path(__file__).with_name("data") / "onnx_tensorrt_support.json"

# ONNX element types as the support matrix names them.
MATRIX_TYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64", onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.INT8: "INT8", onnx.TensorProto.DOUBLE: "DOUBLE",
}
# Ops whose data operand is not input 0.
DATA_INPUT: dict[str, int] = {"Where": 1}
# Dtypes TensorRT's fused attention kernels take (NVIDIA "Fused Attention"; IAttention: kHALF/kBF16/FP8).
FUSED_ATTENTION_TYPES = frozenset({onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16})

CHECKS = ("support", "constants", "attention", "refold")


class StaticCheckError(KvtError, RuntimeError):
    """An exported graph breaks a rule TensorRT needs (the message lists every problem)."""


@dataclass(frozen=True)
class Problem:
    check: str  # one of CHECKS (or "opset")
    node: str  # node name (or "" for the graph)
    message: str

    def __str__(self) -> str:
        where = f"node {self.node!r}" if self.node else "graph"
        return f"[{self.check}] {where}: {self.message}"


@dataclass(frozen=True)
class AttentionSite:
    """One Softmax and what surrounds it."""

    softmax: str
    bmm1: str | None
    bmm2: str | None
    dtype: int  # onnx.TensorProto element type of the Softmax input
    masked: bool
    problems: tuple[str, ...] = ()  # what breaks the fusable form (empty: the form is fusable)

    @property
    def fusable_form(self) -> bool:
        return not self.problems

    @property
    def fused_kernel_expected(self) -> bool:
        """The form is fusable and the dtype is one TensorRT's fused attention kernels take."""
        return self.fusable_form and self.dtype in FUSED_ATTENTION_TYPES

    def describe(self) -> str:
        dtype = onnx.TensorProto.DataType.Name(self.dtype)
        mask = "add mask" if self.masked else "no mask"
        if self.problems:
            return f"{self.softmax}: {dtype}, {mask}, NOT fusable: {'; '.join(self.problems)}"
        kernel = "fused kernel expected" if self.fused_kernel_expected else "fusable form, no fused kernel for this dtype"
        return f"{self.softmax}: {dtype}, {mask}, {kernel}"


@dataclass
class GraphReport:
    name: str
    problems: list[Problem] = field(default_factory=list)
    attention: list[AttentionSite] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# ------------------------------------------------------------------------------------- the matrix

@dataclass(frozen=True)
class SupportMatrix:
    minimum_tensorrt: str
    opsets: tuple[int, int]
    types: dict[str, tuple[str, ...]]
    constant_inputs: dict[str, tuple[tuple[int, str, str], ...]]  # op -> (input index, name, source)
    resize: dict[str, tuple[Any, ...]]
    sources: dict[str, str]

    @classmethod
    def load(cls, path: Path = SUPPORT_FILE) -> SupportMatrix:
        data = json.loads(path.read_text())
        return cls(data["minimum_tensorrt"], tuple(data["opsets"]),  # type: ignore[arg-type]
                   {op: tuple(types) for op, types in data["types"].items()},
                   {op: tuple((int(i), str(n), str(s)) for i, n, s in rules)
                    for op, rules in data["constant_inputs"].items()},
                   {k: tuple(v) for k, v in data["resize"].items()}, dict(data["sources"]))


@lru_cache(maxsize=1)
def support_matrix() -> SupportMatrix:
    return SupportMatrix.load()


# ------------------------------------------------------------------------------------- the graph

class Graph:
    """Producers, consumers, element types and initializers of one ONNX graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        if not any(v.type.tensor_type.elem_type for v in model.graph.value_info):
            model = onnx.shape_inference.infer_shapes(model)
        self.model = model
        graph = model.graph
        self.nodes = list(graph.node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.inputs = {v.name for v in graph.input}
        self.types: dict[str, int] = {t.name: t.data_type for t in graph.initializer}
        self.ranks: dict[str, int] = {t.name: len(t.dims) for t in graph.initializer}
        for value in list(graph.input) + list(graph.output) + list(graph.value_info):
            kind = value.type.tensor_type
            if kind.elem_type:
                self.types[value.name] = kind.elem_type
            if kind.HasField("shape"):
                self.ranks[value.name] = len(kind.shape.dim)
        self.producer: dict[str, onnx.NodeProto] = {out: n for n in self.nodes for out in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)

    def opset(self) -> int:
        return next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 0)

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or (name in self.producer and self.producer[name].op_type == "Constant")


def node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"#{index} {node.op_type}"


def _type_name(elem: int | None) -> str:
    return MATRIX_TYPES.get(elem or 0, onnx.TensorProto.DataType.Name(elem) if elem else "unknown")


# ------------------------------------------------------------------------------------- 1. support

def check_support(graph: Graph, matrix: SupportMatrix | None = None) -> list[Problem]:
    """Every node's op and data dtype (Cast: both sides) in the matrix; Resize's attributes; opset."""
    matrix = matrix or support_matrix()
    problems = []
    low, high = matrix.opsets
    if not low <= graph.opset() <= high:
        problems.append(Problem("support", "", f"opset {graph.opset()} is outside TensorRT "
                                               f"{matrix.minimum_tensorrt}'s range {low}..{high}"))
    for index, node in enumerate(graph.nodes):
        label = node_label(node, index)
        allowed = matrix.types.get(node.op_type)
        if node.domain not in ("", "ai.onnx") or allowed is None:
            problems.append(Problem("support", label, f"op {node.op_type} (domain {node.domain or 'ai.onnx'}) "
                                                      f"is not in the support matrix of TensorRT "
                                                      f"{matrix.minimum_tensorrt}"))
            continue
        operands = [node.input[DATA_INPUT.get(node.op_type, 0)]] if node.input else []
        if node.op_type in ("Cast", "CastLike", "ConstantOfShape"):
            operands = [name for name in list(node.input[:1]) + list(node.output[:1]) if name]
        for name in operands:
            dtype = _type_name(graph.types.get(name))
            if dtype not in allowed:
                problems.append(Problem("support", label, f"{node.op_type} on {dtype} ({name!r}); TensorRT "
                                                          f"{matrix.minimum_tensorrt} supports "
                                                          f"{', '.join(allowed)}"))
        if node.op_type == "Resize":
            problems += _check_resize(node, label, matrix)
    return problems


_RESIZE_DEFAULTS = {"mode": "nearest", "coordinate_transformation_mode": "half_pixel",
                    "nearest_mode": "round_prefer_floor", "keep_aspect_ratio_policy": "stretch", "antialias": 0}


def _check_resize(node: onnx.NodeProto, label: str, matrix: SupportMatrix) -> list[Problem]:
    values = dict(_RESIZE_DEFAULTS)
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        values[attr.name] = value.decode() if isinstance(value, bytes) else value
    problems = []
    for name, allowed in matrix.resize.items():
        if name == "nearest_mode" and values["mode"] != "nearest":
            continue
        if values.get(name) not in allowed:
            problems.append(Problem("support", label, f"Resize {name}={values.get(name)!r}; supported: "
                                                      f"{list(allowed)}"))
    return problems


# ------------------------------------------------------------------------------------- 2. constants

def check_constants(graph: Graph, matrix: SupportMatrix | None = None) -> list[Problem]:
    """Operands TensorRT needs at build time are initializers (or Constant nodes)."""
    matrix = matrix or support_matrix()
    problems = []
    for index, node in enumerate(graph.nodes):
        for position, name, source in matrix.constant_inputs.get(node.op_type, ()):
            if position >= len(node.input) or not node.input[position]:
                continue  # optional operand absent
            operand = node.input[position]
            if graph.is_constant(operand):
                continue
            made_by = graph.producer[operand].op_type if operand in graph.producer else "a graph input"
            why = "the support matrix requires it" if source == "matrix" else "kvt's policy (see the data file)"
            problems.append(Problem("constants", node_label(node, index),
                                    f"{node.op_type} input {position} ({name}) {operand!r} is computed by "
                                    f"{made_by}, not an initializer ({why})"))
    return problems


# ------------------------------------------------------------------------------------- 3. attention

def attention_sites(graph: Graph) -> list[AttentionSite]:
    """Every Softmax with the pattern around it (see the module docstring)."""
    sites = []
    for index, node in enumerate(graph.nodes):
        if node.op_type != "Softmax":
            continue
        problems: list[str] = []
        label = node_label(node, index)
        source = node.input[0]
        rank = graph.ranks.get(source)
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        if axis != -1 and (rank is None or axis != rank - 1):
            problems.append(f"Softmax over axis {axis}, not the last")
        # Softmax -> BMM2: the only consumer, as its first operand.
        consumers = graph.consumers.get(node.output[0], [])
        bmm2 = consumers[0] if len(consumers) == 1 and consumers[0].op_type == "MatMul" else None
        if bmm2 is None or bmm2.input[0] != node.output[0]:
            ops = [c.op_type for c in consumers] or ["nothing"]
            problems.append(f"Softmax output feeds {', '.join(ops)} (the fused pattern needs BMM2 alone)")
            bmm2 = None
        # BMM1 -> [Add mask] -> Softmax.
        masked = False
        chain: list[str] = []
        current = graph.producer.get(source)
        if current is not None and current.op_type == "Add":
            masked = True
            from_matmul = [name for name in current.input if name in graph.producer
                           and graph.producer[name].op_type == "MatMul"]
            if len(from_matmul) != 1:
                problems.append("the Add before Softmax does not add a mask to one MatMul's scores")
                current = None
            else:
                mask = next(name for name in current.input if name != from_matmul[0])
                if graph.types.get(mask) == onnx.TensorProto.BOOL:
                    problems.append("boolean mask added to the scores")
                current = graph.producer[from_matmul[0]]
        while current is not None and current.op_type != "MatMul":
            chain.append(current.op_type)
            current = graph.producer.get(current.input[0]) if current.input else None
        bmm1 = current
        if chain:
            problems.append(f"between BMM1 and Softmax: {' -> '.join(reversed(chain))}")
        if bmm1 is None:
            problems.append("no MatMul (BMM1) feeds the Softmax")
        elif len(graph.consumers.get(bmm1.output[0], [])) != 1:
            problems.append("the scores of BMM1 have other consumers")
        sites.append(AttentionSite(label, bmm1.name if bmm1 is not None else None,
                                   bmm2.name if bmm2 is not None else None,
                                   graph.types.get(source, 0), masked, tuple(problems)))
    return sites


def check_attention(graph: Graph) -> tuple[list[Problem], list[AttentionSite]]:
    sites = attention_sites(graph)
    problems = [Problem("attention", site.softmax, "; ".join(site.problems)) for site in sites if site.problems]
    return problems, sites


# ------------------------------------------------------------------------------------- 4. refold

def weights_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the graph with its weights (``network.*`` initializers) as graph inputs and no weight
    data: the state in which the exporter's clean-up folds."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    kept = []
    for tensor in graph.initializer:
        if tensor.name.startswith(WEIGHT_PREFIX):
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        else:
            kept.append(tensor)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return out


def check_refold(model: onnx.ModelProto) -> list[Problem]:
    """One more Polygraphy constant fold (as kvt.export.cleanup runs it) removes no node."""
    from polygraphy.backend.onnx import fold_constants
    from polygraphy.logger import G_LOGGER

    candidate = weights_as_inputs(model)
    before = [(n.name, n.op_type) for n in candidate.graph.node]
    previous = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.ERROR
    try:
        folded = fold_constants(candidate, num_passes=None, do_shape_inference=True, fold_shapes=False,
                                partitioning=None, error_ok=False)
    finally:
        G_LOGGER.module_severity = previous
    after = {(n.name, n.op_type) for n in folded.graph.node}
    removed = [f"{name or '?'} ({op})" for name, op in before if (name, op) not in after]
    if not removed:
        return []
    shown = ", ".join(removed[:8]) + (f" and {len(removed) - 8} more" if len(removed) > 8 else "")
    return [Problem("refold", "", f"a further constant fold removes {len(removed)} node(s): {shown}")]


# ------------------------------------------------------------------------------------- graphs, exports

def check_model(model: onnx.ModelProto, name: str = "graph", checks: Iterable[str] = CHECKS,
                matrix: SupportMatrix | None = None) -> GraphReport:
    """The checks on one ONNX model (weights may be external and not loaded)."""
    wanted = set(checks)
    unknown = wanted - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown checks {sorted(unknown)}; checks: {list(CHECKS)}")
    graph = Graph(model)
    report = GraphReport(name)
    if "support" in wanted:
        report.problems += check_support(graph, matrix)
    if "constants" in wanted:
        report.problems += check_constants(graph, matrix)
    problems, report.attention = check_attention(graph)
    if "attention" in wanted:
        report.problems += problems
    if "refold" in wanted:
        report.problems += check_refold(graph.model)
    return report


def load_graph(path: Path) -> onnx.ModelProto:
    """The graph without its weights' data (cheap for external-data models)."""
    return onnx.load(str(path), load_external_data=False)


def check_export(export_dir: str | Path, stages: Sequence[str] | None = None,
                 checks: Iterable[str] = CHECKS) -> dict[str, GraphReport]:
    """The checks on every (or the named) stage of a ``kvt export`` directory."""
    export_dir = Path(export_dir)
    manifest = ExportManifest.read(export_dir)
    names = list(stages) if stages is not None else list(manifest.stages)
    manifest.verify_files(export_dir, names)
    checks = tuple(checks)
    return {name: check_model(load_graph(export_dir / manifest.stages[name].file), name, checks)
            for name in names}


def require_clean(reports: dict[str, GraphReport]) -> None:
    """Raise :class:`StaticCheckError` listing every problem of ``reports``."""
    lines = [f"{name}: {problem}" for name, report in reports.items() for problem in report.problems]
    if lines:
        raise StaticCheckError(f"{len(lines)} static check problem(s):\n  " + "\n  ".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvt.engines.static_checks",
                                     description="Static TensorRT checks of a kvt export (see the module docstring).")
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--stages", help="comma-separated stages (default: all)")
    parser.add_argument("--no-refold", action="store_true", help="skip the refold check (needs polygraphy)")
    args = parser.parse_args(argv)
    checks = [c for c in CHECKS if not (args.no_refold and c == "refold")]
    stages = [s for s in args.stages.split(",") if s] if args.stages else None
    reports = check_export(args.export_dir, stages, checks)
    count = 0
    for name, report in reports.items():
        for problem in report.problems:
            print(f"{name}: {problem}")
            count += 1
        fused = sum(s.fused_kernel_expected for s in report.attention)
        print(f"{name}: {len(report.attention)} attention site(s), {fused} with a fused kernel expected",
              file=sys.stderr)
        for site in report.attention:
            if not site.fused_kernel_expected:
                print(f"  {site.describe()}", file=sys.stderr)
    matrix = support_matrix()
    print(f"static_checks: {count} problem(s) in {len(reports)} graph(s) (support matrix: TensorRT "
          f">= {matrix.minimum_tensorrt}, opsets {matrix.opsets[0]}..{matrix.opsets[1]})", file=sys.stderr)
    return 1 if count else 0


if __name__ == "__main__":
    sys.exit(main())
