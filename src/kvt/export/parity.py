"""Parity of exported stages: torch fp32 (the reference) against ONNX Runtime on the exported graph.

For every stage and every shape asked for (min, opt, max of each optimisation profile and one odd size
inside the range), the same realistic inputs (``StageSpec.sample_inputs``) run through the torch
network in float32 and through the exported graph on ONNX Runtime's CPU provider. Reported per case:
max abs error, max relative error (to the reference's peak magnitude), cosine similarity, and whether
the output is finite. A stage fails the export when a case exceeds its threshold or is not finite.

Reference networks are built one at a time from the export's weight source and freed before ONNX
Runtime loads the graph, so full-size parity needs one network's memory, not the model set's.
"""

from __future__ import annotations

import gc
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvt.contract.stages import Dim, StageSpec, StageTable
from kvt.models.stage_modules import stage_module

SHAPE_LABELS = ("min", "opt", "max", "odd")


@dataclass(frozen=True)
class Threshold:
    max_rel: float  # max |ours - torch| / max |torch|
    min_cosine: float


# Measured 2026-11-25 on ONNX Runtime 1.32 CPU. Tiny preset, reference weights: FP32 graphs within
# 4.6e-6 relative (cosine 1.0000000), FP16 U-Nets within 4.1e-3 (cosine >= 0.999994). Full size, random
# weights, min shapes: FP32 MoVQ decoder 7.9e-5 (deep 1024-channel convolutions accumulate more rounding
# than tiny ones). The thresholds leave room for the released sizes and still fail a wrong graph,
# whose errors are of order 1.
THRESHOLDS = {"fp32": Threshold(max_rel=1e-3, min_cosine=0.99999),
              "fp16": Threshold(max_rel=5e-2, min_cosine=0.9995)}


@dataclass
class CaseResult:
    stage: str
    precision: str
    shape: str
    dims: dict[str, int]
    max_abs: float
    max_rel: float
    cosine: float
    finite: bool
    passed: bool


@dataclass
class StageParity:
    stage: str
    precision: str
    threshold: dict[str, float]
    cases: list[CaseResult] = field(default_factory=list)
    skipped: str | None = None

    @property
    def passed(self) -> bool:
        return self.skipped is None and all(c.passed for c in self.cases)


def parity_dims(spec: StageSpec, labels: tuple[str, ...]) -> list[tuple[str, dict[str, int]]]:
    """Concrete dims per label: min / opt / max of each optimisation profile and one "odd" size.

    Coinciding corners are checked once under a joint label ("min=opt"); the odd size is non-square
    where the range allows, so a height/width mix-up cannot pass.
    """
    out: list[tuple[str, dict[str, int]]] = []
    for index, profile in enumerate(spec.profiles):
        suffix = "" if index == 0 else f"#{index}"
        for label in labels:
            if label == "odd":
                continue
            dims = {name: getattr(dim, label) for name, dim in profile.items()}
            same = next((i for i, (_, d) in enumerate(out) if d == dims), None)
            if same is None:
                out.append((label + suffix, dims))
            else:
                out[same] = (f"{out[same][0]}={label}{suffix}", dims)
    if "odd" in labels:
        seen: dict[Dim, int] = {}
        odd = {}
        for name, dim in spec.dims.items():
            odd[name] = _odd_value(dim, seen.get(dim, 0))
            seen[dim] = seen.get(dim, 0) + 1
        out.append(("odd", odd))
    return out


def _odd_value(dim: Dim, rank: int = 0) -> int:
    """The rank-th valid value nearest the middle of the range that is none of min / opt / max."""
    taken = {dim.min, dim.opt, dim.max}
    values = [v for v in range(dim.min, dim.max + 1, dim.multiple_of) if v not in taken]
    if not values:
        return dim.opt
    middle = sorted(values, key=lambda v: (abs(v - (dim.min + dim.max) / 2), v))
    return middle[min(rank, len(middle) - 1)]


def compare(ours: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    ours64, ref64 = ours.astype(np.float64), reference.astype(np.float64)
    finite = bool(np.isfinite(ours64).all())
    diff = np.abs(ours64 - ref64)
    peak = float(np.abs(ref64).max()) or 1.0
    denom = float(np.linalg.norm(ours64) * np.linalg.norm(ref64))
    cosine = float((ours64 * ref64).sum() / denom) if denom > 0 else (1.0 if not diff.any() else 0.0)
    return {"max_abs": float(diff.max()) if finite else math.inf,
            "max_rel": float(diff.max()) / peak if finite else math.inf,
            "cosine": cosine if finite else 0.0, "finite": finite}


def available_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def materialize(opened, network: str) -> torch.nn.Module:
    """One network in float32 with the source's weights (for the torch reference)."""
    module = opened.build(network)
    names = list(module.state_dict().keys())
    module.load_state_dict({n: opened.tensors[network](n).float() for n in names}, strict=True, assign=True)
    return module.float().eval().requires_grad_(False)


def network_bytes(opened, network: str) -> int:
    return sum(p.numel() * 4 for p in opened.build(network).parameters())


def parity_memory_bytes(opened, network: str, onnx_path: Path, precision: str) -> int:
    """Peak memory of a stage's parity check: the torch FP32 reference, then (after it is freed) the
    ONNX Runtime session. ORT's CPU provider casts FP16 weights it has no kernels for to FP32, so an
    FP16 graph can cost its own size plus twice that."""
    onnx_bytes = sum(f.stat().st_size for f in onnx_path.parent.glob(onnx_path.name + "*"))
    session = onnx_bytes * (3 if precision == "fp16" else 1)
    return int(max(network_bytes(opened, network), session) * 1.15)


def stage_parity(opened, table: StageTable, stage: str, onnx_path: Path, precision: str,
                 labels: tuple[str, ...], seed: int = 0) -> StageParity:
    """Torch fp32 vs ONNX Runtime (CPU) for one exported stage."""
    import onnxruntime as ort

    spec = table[stage]
    threshold = THRESHOLDS[precision]
    result = StageParity(stage, precision, asdict(threshold))
    need = parity_memory_bytes(opened, spec.network, onnx_path, precision)
    free = available_memory_bytes()
    if free is not None and need > 0.9 * free:
        result.skipped = (f"needs about {need / 2**30:.1f} GiB for the torch reference and the ONNX Runtime "
                          f"session, {free / 2**30:.1f} GiB available")
        return result

    cases = [(label, dims, spec.sample_inputs(dims, seed=seed + i)) for i, (label, dims) in
             enumerate(parity_dims(spec, labels))]
    # The reference is the official per-row form: parity then also covers the exact cuts of the graph.
    module = stage_module(stage, materialize(opened, spec.network), cuts=False)
    with torch.inference_mode():
        references = [module(*[inputs[n] for n in spec.input_names]).numpy() for _, _, inputs in cases]
    del module
    gc.collect()

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    for (label, dims, inputs), reference in zip(cases, references):
        ours = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        metrics = compare(ours, reference)
        passed = (metrics["finite"] and metrics["max_rel"] <= threshold.max_rel
                  and metrics["cosine"] >= threshold.min_cosine)
        result.cases.append(CaseResult(stage, precision, label, dims, passed=passed, **metrics))
    del session
    gc.collect()
    return result


def write_report(results: list[StageParity], directory: Path, title: str) -> dict[str, Any]:
    """parity.json and parity.md in ``directory``; returns the summary stored in the manifest."""
    data = [{"stage": r.stage, "precision": r.precision, "threshold": r.threshold, "passed": r.passed,
             "skipped": r.skipped, "cases": [asdict(c) for c in r.cases]} for r in results]
    (directory / "parity.json").write_text(json.dumps(data, indent=1) + "\n")
    lines = [f"# Parity: {title}", "",
             "Torch float32 (reference) vs ONNX Runtime CPU on the exported graph, same inputs. "
             "max rel = max abs error / max |reference|.", "",
             "| stage | precision | shape | dims | max abs | max rel | cosine | finite | threshold (rel / cos) | ok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        thr = f"{r.threshold['max_rel']:.0e} / {r.threshold['min_cosine']}"
        if r.skipped:
            lines.append(f"| {r.stage} | {r.precision} | - | - | - | - | - | - | {thr} | skipped: {r.skipped} |")
        for c in r.cases:
            dims = " ".join(f"{k}={v}" for k, v in c.dims.items())
            lines.append(f"| {c.stage} | {c.precision} | {c.shape} | {dims} | {c.max_abs:.2e} | {c.max_rel:.2e} | "
                         f"{c.cosine:.8f} | {c.finite} | {thr} | {'yes' if c.passed else '**NO**'} |")
    (directory / "parity.md").write_text("\n".join(lines) + "\n")
    return {r.stage: {"passed": r.passed, "skipped": r.skipped,
                      "worst_max_rel": max((c.max_rel for c in r.cases), default=None),
                      "worst_cosine": min((c.cosine for c in r.cases), default=None)} for r in results}


def threads_hint() -> None:
    """ONNX Runtime and torch share the cores; keep ORT from oversubscribing them."""
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, torch.get_num_threads())))
