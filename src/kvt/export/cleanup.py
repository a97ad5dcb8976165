"""Graph clean-up of an exported stage (weights still graph inputs, so this is cheap at any size).

1. strip the exporter's per-node metadata (stack traces and scopes: most of a graph-only file);
2. constants as typed initializers; ``CastLike`` with a known target rewritten as ``Cast`` (ONNX Runtime,
   which evaluates the folded subgraphs, has no CastLike kernel); constant folding and shape inference
   with Polygraphy (the shape arithmetic of dynamic axes);
3. ``CastLike`` whose target became known by folding rewritten too, ``Shape`` of a weight (a graph input
   of static shape until attach.py) replaced by its value, and a second fold: what the first could not
   reach (GroupNorm's InstanceNormalization scale/bias, the computed zero bias of bias-free convolutions)
   becomes an initializer, as TensorRT's parser wants build-time constants; onnx-graphsurgeon clean-up
   (dead nodes, unused weight inputs) and topological sort;
4. checks that the graph is TensorRT-parseable: opset 18, no sequence or control-flow ops, the stage's
   inputs and outputs intact.

Softmax keeps the graph's dtype: TensorRT's fused attention kernels accumulate in FP32 anyway, and Casts
around Softmax would break the BMM1 -> Softmax -> BMM2 pattern it fuses (kvt.engines.static_checks
lints it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx

from kvt.contract.stages import StageSpec
from kvt.export.graph_export import ExportError

log = logging.getLogger(__name__)

# Ops TensorRT's ONNX parser cannot take (sequences) or that would put control flow in an engine.
FORBIDDEN_OPS = frozenset({"SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceInsert",
                           "SequenceLength", "SplitToSequence", "ConcatFromSequence", "If", "Loop", "Scan"})


class GraphCheckError(ExportError):
    """An exported graph would not parse in TensorRT or breaks its stage contract."""


def strip_metadata(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for value in list(model.graph.value_info):
        del value.metadata_props[:]


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Replace ``Constant`` nodes by initializers of the same dtype.

    onnx-graphsurgeon reads an empty ``value_floats`` / ``value_ints`` constant (Resize's ``roi``,
    the shape of a scalar) as a float64 array, which ONNX Runtime then rejects; typed initializers
    keep their dtype through folding.
    """
    import numpy as np
    from onnx import numpy_helper

    kinds = {"value_floats": np.float32, "value_ints": np.int64, "value_float": np.float32,
             "value_int": np.int64}
    kept, moved = [], 0
    for node in model.graph.node:
        if node.op_type != "Constant" or len(node.attribute) != 1:
            kept.append(node)
            continue
        attr = node.attribute[0]
        if attr.name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr.t)
        elif attr.name in kinds:
            value = onnx.helper.get_attribute_value(attr)
            tensor = numpy_helper.from_array(np.asarray(value, dtype=kinds[attr.name]))
        else:  # sparse or string constants: leave them alone
            kept.append(node)
            continue
        tensor.name = node.output[0]
        model.graph.initializer.append(tensor)
        moved += 1
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return moved


def fold_and_infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Polygraphy constant folding and shape inference until nothing changes.

    ``fold_shapes=False``: onnx-graphsurgeon's shape folding (0.6.1) rewrites ``Cast(int constant ->
    float)`` as an int64 constant, producing graphs ONNX Runtime rejects (seen in T5's position
    buckets); plain constant folding is correct and reaches fewer nodes on these graphs.
    """
    from polygraphy.backend.onnx import fold_constants
    from polygraphy.logger import G_LOGGER

    previous = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.ERROR
    try:
        return fold_constants(model, num_passes=None, do_shape_inference=True, fold_shapes=False,
                              partitioning=None, error_ok=False)
    finally:
        G_LOGGER.module_severity = previous


def infer_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape and type inference (strict: a type conflict is an error here, not in TensorRT)."""
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    model.CopyFrom(inferred)
    return model


def graphsurgeon_cleanup(model: onnx.ModelProto, keep_inputs: tuple[str, ...]) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.cleanup(remove_unused_graph_inputs=True).toposort()
    missing = [name for name in keep_inputs if name not in {t.name for t in graph.inputs}]
    if missing:
        raise GraphCheckError(f"inputs {missing} of the stage contract are unused by the graph")
    return gs.export_onnx(graph, do_type_check=True)


def castlike_to_cast(model: onnx.ModelProto) -> int:
    """``CastLike(x, like)`` -> ``Cast(x, to=dtype of like)`` wherever that dtype is known."""
    import onnx_graphsurgeon as gs
    from onnx import helper

    graph = gs.import_onnx(model)
    rewritten = 0
    for node in graph.nodes:
        if node.op != "CastLike" or node.inputs[1].dtype is None:
            continue
        node.op = "Cast"
        node.attrs = {"to": helper.np_dtype_to_tensor_dtype(node.inputs[1].dtype)}
        node.inputs = node.inputs[:1]
        rewritten += 1
    graph.cleanup().toposort()
    model.CopyFrom(gs.export_onnx(graph))
    return rewritten


def fold_weight_shapes(model: onnx.ModelProto) -> int:
    """``Shape`` of a graph input whose shape is static (the weights, graph inputs until attach.py) ->
    an int64 initializer, so the folding after it reaches what depends on a weight's shape (torchlib's
    zero bias of a bias-free convolution is ``Expand(0, Shape(weight)[:1])``). Returns how many."""
    import numpy as np
    from onnx import numpy_helper

    static = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            static[value.name] = [d.dim_value for d in dims]
    kept, folded = [], 0
    for node in model.graph.node:
        if node.op_type != "Shape" or node.input[0] not in static:
            kept.append(node)
            continue
        attrs = {a.name: a.i for a in node.attribute}
        shape = static[node.input[0]]
        start, end = attrs.get("start", 0), attrs.get("end", len(shape))
        model.graph.initializer.append(
            numpy_helper.from_array(np.asarray(shape[start:end], dtype=np.int64), node.output[0]))
        folded += 1
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return folded


def check_graph(model: onnx.ModelProto, spec: StageSpec, opset: int) -> None:
    ops = {node.op_type for node in model.graph.node}
    forbidden = sorted(ops & FORBIDDEN_OPS)
    if forbidden:
        raise GraphCheckError(f"stage {spec.name}: ops {forbidden} cannot be parsed by TensorRT")
    versions = {o.domain: o.version for o in model.opset_import}
    if versions.get("", versions.get("ai.onnx")) != opset:
        raise GraphCheckError(f"stage {spec.name}: opset {versions} is not {opset}")
    inputs = [i.name for i in model.graph.input][: len(spec.inputs)]
    outputs = [o.name for o in model.graph.output]
    if inputs != list(spec.input_names) or outputs != list(spec.output_names):
        raise GraphCheckError(f"stage {spec.name}: graph I/O {inputs} -> {outputs} does not match the "
                              f"stage table {list(spec.input_names)} -> {list(spec.output_names)}")


class _NamedTensors(list):  # type: ignore[type-arg]
    """A list of onnx-graphsurgeon tensors whose ``in`` is a set lookup by name (Tensor.__eq__ compares
    names, so the answer is the same)."""

    def __init__(self, tensors: list[Any]) -> None:
        super().__init__(tensors)
        self._names = {tensor.name for tensor in tensors}

    def __contains__(self, tensor: object) -> bool:
        return getattr(tensor, "name", None) in self._names


@contextlib.contextmanager
def linear_graphsurgeon_cleanup() -> Iterator[None]:
    """onnx-graphsurgeon 0.6's ``Graph.cleanup`` tests every graph input with ``in`` against the list of
    used tensors: graph inputs x tensors comparisons. Our graphs keep every weight as a graph input, so
    that was ~45 M comparisons for a tiny U-Net, two thirds of its clean-up time, and it runs once per
    folding pass. This makes the membership test a set lookup for the duration of the block; the
    cleaned graph is the same."""
    import onnx_graphsurgeon as gs

    original = gs.Graph._get_used_node_ids

    def used_node_ids(graph: Any) -> tuple[set[int], list[Any]]:
        node_ids, tensors = original(graph)
        return node_ids, _NamedTensors(tensors)

    gs.Graph._get_used_node_ids = used_node_ids
    try:
        yield
    finally:
        gs.Graph._get_used_node_ids = original


def clean_graph(path: Path, spec: StageSpec, opset: int, fp16: bool) -> dict[str, int]:
    """Clean the graph-only model at ``path`` in place; returns node counts. ``fp16`` needs no pass of
    its own any more (Softmax keeps the graph's dtype); kept for the exporter's call."""
    with linear_graphsurgeon_cleanup():
        return _clean_graph(path, spec, opset, fp16)


def _clean_graph(path: Path, spec: StageSpec, opset: int, fp16: bool) -> dict[str, int]:
    model = onnx.load(str(path))
    before = len(model.graph.node)
    strip_metadata(model)
    constants_to_initializers(model)
    castlike = castlike_to_cast(infer_types(model))
    model = fold_and_infer(model)
    castlike += castlike_to_cast(infer_types(model))
    shapes = fold_weight_shapes(model)
    model = fold_and_infer(model)  # the second fold (kvt.engines.static_checks checks a third removes nothing)
    model = graphsurgeon_cleanup(model, spec.input_names)
    model = infer_types(model)
    check_graph(model, spec, opset)
    onnx.save(model, str(path))
    stats = {"nodes_exported": before, "nodes": len(model.graph.node), "castlike_to_cast": castlike,
             "weight_shapes_folded": shapes}
    log.info("stage %s: %d -> %d nodes", spec.name, before, len(model.graph.node))
    return stats
