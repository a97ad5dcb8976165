"""Torch -> ONNX for one stage: the graph only, traced from a network on the meta device.

Opset 18: TensorRT 10.0's parser reads opsets 9-20 (10.15: 9-24) and TensorRT 11.0-11.4 up to 24
(11.5: 25), so 18 parses on every 10.x and 11.x; torch's dynamo exporter needs >= 18 (its opset-17 output has an invalid Split); and
opset 21's redefined GroupNormalization is avoided (group norms export as InstanceNormalization, which
every TensorRT 10.x parses).

The exporter is torch's dynamo-based ``torch.onnx.export`` (``optimize=False``: onnxscript's optimizer
took ~4x the tracing time here; polygraphy folds the graph afterwards, see cleanup.py). Tracing runs on
the meta device, so it needs no weights and little memory at any model size; the weights become graph
inputs named ``network.<parameter>`` until attach.py turns them into initializers.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from kvt.contract.errors import KvtError
from kvt.contract.stages import StageSpec, axis_name
from kvt.formats.export_dir import WEIGHT_PREFIX

OPSET = 18

log = logging.getLogger(__name__)


# Loggers of the exporter stack whose warnings are not the user's business unless they ask (-v): torch.onnx
# warns once per process that torchvision is not installed (its ops are skipped), onnxscript about
# opset conversions.
_THIRD_PARTY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def third_party_quiet(verbose: bool) -> Iterator[None]:
    """Silence the exporter stack's progress prints and warnings unless ``verbose``."""
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in _THIRD_PARTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class ExportError(KvtError, RuntimeError):
    """A stage could not be exported, or its graph breaks the stage contract."""


def trace_dims(spec: StageSpec) -> dict[str, int]:
    """Dimension values to trace with: on the dim's step, all distinct, > 1 and unlike any static size.

    The dynamo exporter specialises a dimension whose sample value is 1, or equal to another
    dimension it can be confused with; distinct values keep every dynamic axis symbolic. Tracing runs
    on the meta device, so a value above the profile's max costs nothing; the graph stays dynamic.
    """
    reserved = {e for t in spec.inputs + spec.outputs for e in t.shape if isinstance(e, int)}
    chosen: dict[str, int] = {}
    for name, dim in spec.dims.items():
        value = max(dim.min, 2 * dim.multiple_of)
        value += (-value) % dim.multiple_of
        while value in reserved or value in chosen.values() or value <= 1:
            value += dim.multiple_of
        chosen[name] = value
    return chosen


def export_graph(module: nn.Module, spec: StageSpec, path: Path, verbose: bool = False) -> list[str]:
    """Export ``module`` (weights on the meta device) to ``path`` with weights as graph inputs.

    Returns the weight names (``network.<parameter>``). Dynamic axes come from the stage table; an axis
    the exporter specialised to a constant is an :class:`ExportError`.
    """
    dims = trace_dims(spec)
    sample = spec.sample_inputs(dims)
    args = tuple(sample[name].to("meta") for name in spec.input_names)
    dynamic_shapes = tuple({axis: torch.export.Dim.AUTO for axis in t.dynamic_axes} for t in spec.inputs)
    with third_party_quiet(verbose), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module, args, input_names=list(spec.input_names), output_names=list(spec.output_names),
                dynamic_shapes=dynamic_shapes, opset_version=OPSET, dynamo=True, optimize=False,
                verify=False, report=False, verbose=verbose,
            )
        except Exception as exc:  # the exporter raises many types; keep the stage in the message
            raise ExportError(f"stage {spec.name}: torch.onnx.export failed: {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}") from exc
    assert program is not None  # dynamo=True always returns an ONNXProgram
    _name_dynamic_axes(program, spec)
    weights = [name for name in program.model.graph.initializers]
    unknown = [w for w in weights if not w.startswith(WEIGHT_PREFIX)]
    if unknown:
        raise ExportError(f"stage {spec.name}: constants without a parameter behind them: {unknown[:5]}")
    program.save(str(path), include_initializers=False, keep_initializers_as_inputs=True)
    return weights


def _name_dynamic_axes(program, spec: StageSpec) -> None:
    """Give the exporter's symbols (s31, s73, ...) the stage table's names; fail on specialised axes."""
    graph = program.model.graph
    by_name = {v.name: v for v in list(graph.inputs) + list(graph.outputs)}
    renames: dict[str, str] = {}
    for tensor in spec.inputs:
        value = by_name[tensor.name]
        for axis, entry in enumerate(tensor.shape):
            if isinstance(entry, int):
                continue
            dim = value.shape[axis]
            if isinstance(dim, int):
                raise ExportError(f"stage {spec.name}: input {tensor.name!r} axis {axis} ({entry}) was "
                                  f"specialised to {dim} by the exporter; it must stay dynamic")
            renames[str(dim.value)] = axis_name(entry)
    if not renames:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, renames)) + r")\b")
    for value in by_name.values():
        if value.shape is None:
            continue
        dims = [d if isinstance(d, int) else pattern.sub(lambda m: renames[m.group(1)], str(d.value))
                for d in value.shape]
        value.shape = type(value.shape)(dims)
