"""``kvt export``: every stage of the stage table to ONNX, with assets, a parity report and a manifest.

Per stage (in worker processes when ``jobs`` > 1): build the network on the meta device in the stage's
compute precision, trace the graph (graph_export.py), clean it (cleanup.py), stream the weights in
(attach.py). Then, in this process: the tokenizer and null embeddings beside the graphs, parity of
every stage against torch float32 (parity.py), the manifest.

Precision policy of ``--precision fp16``: the three U-Net stages compute in FP16 (weights FP16, the
modules' own FP32 islands, those of the official autocast: each group norm with the modulation and SiLU
that follow it up to the next conv, sinusoidal embeddings; Softmax in FP32 too); the MoVQs stay FP32 unless ``fp16_movq`` (output-changing, off by default, spec
deployment.md); the T5 text encoder always stays FP32 (T5 activations overflow FP16; BF16 has poor
ONNX Runtime CPU coverage). Every graph keeps the stage table's FP32/INT32/BOOL inputs and outputs.

Nothing half-written ever looks complete: stages, assets and manifest are assembled in a temporary
directory beside the output and renamed into place at the end.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kvt.contract.errors import UserError
from kvt.contract.files import replace_dir, temporary_dir_beside
from kvt.contract.stages import ResolutionRange, StageTable
from kvt.export.attach import attach_weights
from kvt.export.cleanup import clean_graph
from kvt.export.graph_export import OPSET, ExportError, export_graph
from kvt.export.parity import SHAPE_LABELS, stage_parity, write_report
from kvt.export.source import ExportSource
from kvt.formats.export_dir import NULL_EMBEDDINGS_FILE, TOKENIZER_DIR, ExportManifest, ExportManifestError, StageEntry
from kvt.models.registry import networks_of_family
from kvt.models.stage_modules import stage_module, stage_table_for

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
UNET_NETWORKS = networks_of_family("unet")
MOVQ_NETWORKS = networks_of_family("movq")


class ExportInputError(ExportError, UserError):
    """A request the exporter refuses before any work: unknown stage, occupied directory, no space."""


class ParityError(ExportError):
    """An exported stage exceeded its parity threshold; the export was not put in place."""


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "fp32"
    fp16_movq: bool = False
    stages: tuple[str, ...] | None = None  # None: every stage of the table
    jobs: int = 1
    parity_shapes: tuple[str, ...] = SHAPE_LABELS  # () skips parity
    overwrite: bool = False
    # Frame sizes (min, opt, max pixels) the export's ranges and parity shapes cover; None: the preset's
    # range when the architecture is a preset's, else 64 / 512 / 1024.
    resolution: tuple[int, int, int] | None = None

    def table(self, config: Any) -> StageTable:
        """The stage table of ``config`` for this export's frame sizes."""
        return stage_table_for(config, None if self.resolution is None else ResolutionRange(*self.resolution))

    def compute_precision(self, network: str) -> str:
        if self.precision == "fp16" and (network in UNET_NETWORKS or
                                         (self.fp16_movq and network in MOVQ_NETWORKS)):
            return "fp16"
        return "fp32"


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for package in ("kandinsky-video-trt", "torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime",
                    "onnxruntime-gpu", "polygraphy", "onnx-graphsurgeon", "transformers"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            continue
    return out


# ---------------------------------------------------------------------------------------- one stage

def export_stage(source: ExportSource, stage: str, compute: str, directory: str,
                 options: ExportOptions = ExportOptions()) -> dict[str, Any]:
    """Export one stage into ``directory`` (runs in a worker process). Returns the manifest entry."""
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    opened = source.open()
    spec = options.table(opened.config)[stage]
    network = opened.build(spec.network)
    if compute == "fp16":
        network = network.half()
    directory_path = Path(directory)
    graph = directory_path / f".{stage}.graph.onnx"
    try:
        export_graph(stage_module(stage, network), spec, graph)
        traced = time.perf_counter()
        stats: dict[str, float] = dict(clean_graph(graph, spec, OPSET, fp16=compute == "fp16"))
        cleaned = time.perf_counter()
        external = attach_weights(graph, directory_path / f"{stage}.onnx", opened.tensors[spec.network],
                                  spec.input_names)
    finally:
        graph.unlink(missing_ok=True)
    entry = StageEntry.from_spec(spec, f"{stage}.onnx", external, compute)
    entry.record_files(directory_path)
    done = time.perf_counter()
    stats.update({"seconds_trace": round(traced - start, 1), "seconds_clean": round(cleaned - traced, 1),
                  "seconds_weights": round(done - cleaned, 1)})
    return {"entry": asdict(entry), "stats": stats}


# ---------------------------------------------------------------------------------------- checks

def _check_options(options: ExportOptions, table_names: tuple[str, ...]) -> tuple[str, ...]:
    if options.precision not in PRECISIONS:
        raise ExportInputError(f"precision {options.precision!r}: allowed {list(PRECISIONS)}")
    if options.jobs < 1:
        raise ExportInputError(f"jobs={options.jobs}: must be at least 1")
    unknown = [s for s in options.parity_shapes if s not in SHAPE_LABELS]
    if unknown:
        raise ExportInputError(f"parity shapes {unknown}: allowed {list(SHAPE_LABELS)} (or none)")
    stages = tuple(options.stages) if options.stages else table_names
    unknown = [s for s in stages if s not in table_names]
    if unknown:
        raise ExportInputError(f"unknown stage(s) {unknown}; the stage table has {list(table_names)}")
    return stages


def _check_out_dir(out_dir: Path, draft: ExportManifest, overwrite: bool) -> ExportManifest | None:
    """An existing identical export is reused; anything else there is refused unless ``overwrite``."""
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise ExportInputError(f"--out {out_dir} exists and is not a directory")
    try:
        existing = ExportManifest.read(out_dir)
    except ExportManifestError:
        if any(out_dir.iterdir()) and not overwrite:
            raise ExportInputError(f"--out {out_dir} is not empty and holds no kvt export; choose another "
                              "directory or pass --overwrite") from None
        return None
    if existing.identity() == draft.identity():
        try:
            existing.verify_files(out_dir)
        except ExportManifestError as exc:
            if not overwrite:
                raise ExportInputError(f"--out {out_dir} holds this export but it is damaged ({exc}); pass "
                                  "--overwrite to export again") from None
            return None
        return None if overwrite else existing
    if not overwrite:
        mine, theirs = draft.identity(), existing.identity()
        differences = [f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} requested"
                       for k in mine if mine.get(k) != theirs.get(k)]
        raise ExportInputError(f"--out {out_dir} already holds a different export ({'; '.join(differences)}); "
                          "choose another directory or pass --overwrite")
    return None


def _estimated_bytes(opened, stages: tuple[str, ...], table, options: ExportOptions) -> int:
    total = 0
    sizes: dict[str, int] = {}
    for stage in stages:
        network = table[stage].network
        if network not in sizes:
            sizes[network] = sum(p.numel() for p in opened.build(network).parameters())
        total += sizes[network] * (2 if options.compute_precision(network) == "fp16" else 4)
    return int(total * 1.05) + (64 << 20)


def _check_disk(out_dir: Path, needed: int) -> None:
    free = shutil.disk_usage(out_dir.parent).free
    if needed > free:
        raise ExportInputError(f"not enough disk space in {out_dir.parent}: the export needs about "
                          f"{needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are free")


# ---------------------------------------------------------------------------------------- the export

def _run_jobs(source: ExportSource, stages: tuple[str, ...], table, options: ExportOptions,
              tmp: Path, report: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    jobs = [(stage, options.compute_precision(table[stage].network)) for stage in stages]
    results: dict[str, dict[str, Any]] = {}
    if options.jobs == 1 or len(jobs) == 1:
        for stage, compute in jobs:
            report(f"exporting {stage} ({compute})")
            results[stage] = export_stage(source, stage, compute, str(tmp), options)
        return results
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    # Longest first (the U-Nets), so the pool finishes together.
    order = sorted(jobs, key=lambda job: table[job[0]].network not in UNET_NETWORKS)
    with ProcessPoolExecutor(max_workers=options.jobs, mp_context=context) as pool:
        futures = {stage: pool.submit(export_stage, source, stage, compute, str(tmp), options)
                   for stage, compute in order}
        report(f"exporting {len(futures)} stages with {options.jobs} worker processes")
        for stage, future in futures.items():
            results[stage] = future.result()
            report(f"exported {stage}")
    return {stage: results[stage] for stage in stages}


def _write_assets(opened, tmp: Path) -> None:
    from safetensors.torch import save_file

    tokenizer_dir = tmp / TOKENIZER_DIR
    tokenizer_dir.mkdir()
    for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (opened.tokenizer_dir / name).is_file():
            shutil.copy2(opened.tokenizer_dir / name, tokenizer_dir / name)
    if not any(tokenizer_dir.iterdir()):
        raise ExportError(f"{opened.tokenizer_dir}: no tokenizer files to copy")
    save_file({"t2v": opened.t2v_null_embedding.float().contiguous(),
               "interpolation": opened.interpolation_null_embedding.float().contiguous()},
              str(tmp / NULL_EMBEDDINGS_FILE))


def export_onnx(source: ExportSource, out_dir: str | Path, options: ExportOptions = ExportOptions(),
                report: Callable[[str], None] = log.info) -> ExportManifest:
    """Export ``source`` to ``out_dir``; returns the manifest (of the existing export if reused)."""
    out_dir = Path(out_dir)
    opened = source.open()  # strict checkpoint checks happen here, before any work
    table = options.table(opened.config)
    stages = _check_options(options, table.names)
    draft = ExportManifest(
        precision=options.precision, opset=OPSET,
        model={"tokens_length": table.model.tokens_length, "context_dim": table.model.context_dim,
               "preset": source.label, "resolution": [table.resolution.min, table.resolution.opt,
                                                       table.resolution.max]},
        source={**source.describe(), **opened.digest()}, tools=tool_versions(),
        options={"fp16_movq": options.fp16_movq, "softmax": "fp32",
                 "compute": {table[s].network: options.compute_precision(table[s].network) for s in stages}},
        stages={s: None for s in stages},  # type: ignore[misc]  # identity needs the names only
    )
    existing = _check_out_dir(out_dir, draft, options.overwrite)
    if existing is not None:
        report(f"{out_dir} already holds this export (same weights, precision, opset and stages): reusing it")
        return existing
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _check_disk(out_dir, _estimated_bytes(opened, stages, table, options))

    tmp = temporary_dir_beside(out_dir)
    try:
        results = _run_jobs(source, stages, table, options, tmp, report)
        draft.stages = {}
        for stage, result in results.items():
            entry = result["entry"]
            draft.stages[stage] = StageEntry.from_spec(table[stage], entry["file"], entry["external_data"],
                                                       entry["compute_precision"])
            draft.stages[stage].files = entry["files"]
        draft.stats = {stage: result["stats"] for stage, result in results.items()}
        _write_assets(opened, tmp)
        parity_ok = True
        if options.parity_shapes:
            parities = []
            for stage in stages:
                report(f"parity {stage}: torch float32 vs ONNX Runtime at {list(options.parity_shapes)}")
                parities.append(stage_parity(opened, table, stage, tmp / draft.stages[stage].file,
                                             draft.stages[stage].compute_precision, options.parity_shapes))
            draft.parity = write_report(parities, tmp, f"{source.label} {options.precision}")
            parity_ok = all(p.passed or p.skipped for p in parities)
        draft.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        draft.write(tmp)
        if not parity_ok:
            rejected = out_dir.parent / f"{out_dir.name}.rejected"
            shutil.rmtree(rejected, ignore_errors=True)
            os.replace(tmp, rejected)
            failed = [s for s, v in draft.parity.items() if not v["passed"] and not v["skipped"]]
            raise ParityError(f"parity thresholds exceeded for {failed}; nothing was written to {out_dir}. "
                              f"The rejected export and its report are in {rejected} (parity.md)")
        replace_dir(tmp, out_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise ExportError(f"disk full while exporting to {out_dir.parent}; nothing was written to "
                              f"{out_dir}") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report(f"wrote {len(stages)} stage(s) to {out_dir}")
    return draft
