"""``kvt export``: every stage of the stage table to ONNX, with assets, a parity report and a manifest.

Per stage (in worker processes when ``jobs`` > 1): build the network on the meta device in the stage's
compute precision, trace the graph (graph_export.py) and clean it (cleanup.py), or take both from the
graph cache (graph_cache.py), then stream the weights in (attach.py). In this process, as each stage
arrives: its parity against torch float32 (parity.py) and one line with its times. Then the tokenizer
and null embeddings beside the graphs and the manifest.

``reuse_stages``: a stage that an export in the same parent directory already holds identically (same
weights digest, opset, compute precision and graph key) is hard-linked (or copied) from there with its
parity results, instead of being exported again: the FP32 stages of an FP16 export (T5, MoVQs) beside
an FP32 export of the same weights.

Precision policy of ``--precision fp16``: the three U-Net stages compute in FP16 (weights FP16, the
modules' own FP32 islands, those of the official autocast: each group norm with the modulation and SiLU
that follow it up to the next conv, sinusoidal embeddings; attention's Softmax stays FP16 so TensorRT can
fuse it, its kernels accumulate in FP32); the MoVQs stay FP32 unless ``fp16_movq`` (output-changing, off by default, spec
deployment.md); the T5 text encoder always stays FP32 (T5 activations overflow FP16; BF16 has poor
ONNX Runtime CPU coverage). Every graph keeps the stage table's FP32/INT32/BOOL inputs and outputs.

Nothing half-written ever looks complete: stages, assets and manifest are assembled in a temporary
directory beside the output and renamed into place at the end.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kvt.contract.errors import UserError
from kvt.contract.files import default_file_mode, replace_dir, temporary_dir_beside
from kvt.contract.stages import ResolutionRange, StageTable
from kvt.export.attach import attach_weights
from kvt.export.cleanup import clean_graph
from kvt.export.graph_cache import GraphCache, graph_key, t5_architecture
from kvt.export.graph_export import OPSET, ExportError, export_graph, third_party_quiet
from kvt.export.parity import SHAPE_LABELS, CaseResult, StageParity, stage_parity, write_report
from kvt.export.source import ExportSource, OpenedSource
from kvt.formats.export_dir import NULL_EMBEDDINGS_FILE, TOKENIZER_DIR, ExportManifest, ExportManifestError, StageEntry
from kvt.models.registry import networks_of_family
from kvt.models.stage_modules import stage_module, stage_table_for
from kvt.runtime.threads import available_cores

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
UNET_NETWORKS = networks_of_family("unet")
MOVQ_NETWORKS = networks_of_family("movq")


class ExportInputError(ExportError, UserError):
    """A request the exporter refuses before any work: unknown stage, occupied directory, no space."""


class ParityError(ExportError):
    """An exported stage exceeded its parity threshold; the export was not put in place."""


def export_table(config: Any, resolution: tuple[int, int, int] | None) -> StageTable:
    """The stage table of ``config`` for an export covering ``resolution`` (min, opt, max pixels)."""
    return stage_table_for(config, None if resolution is None else ResolutionRange(*resolution))


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "fp32"
    fp16_movq: bool = False
    stages: tuple[str, ...] | None = None  # None: every stage of the table
    jobs: int | None = None  # worker processes; None: one per available core, at most one per stage to trace
    parity_shapes: tuple[str, ...] = SHAPE_LABELS  # () skips parity
    overwrite: bool = False
    graph_cache: str | None = None  # folder of the graph cache (graph_cache.py); None: trace every stage
    reuse_stages: bool = False  # take identical stages from exports in the same parent directory
    verbose: bool = False  # third-party tools' messages (torch.onnx, ONNX Runtime)
    # Frame sizes (min, opt, max pixels) the export's ranges and parity shapes cover; None: the preset's
    # range when the architecture is a preset's, else 64 / 512 / 1024.
    resolution: tuple[int, int, int] | None = None

    def table(self, config: Any) -> StageTable:
        """The stage table of ``config`` for this export's frame sizes."""
        return export_table(config, self.resolution)

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
                 cache_dir: str | None = None, verbose: bool = False,
                 resolution: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """Export one stage into ``directory`` (in a worker process or inline). Returns the manifest entry and
    the stage's statistics (node counts, seconds per step, whether the graph came from the cache)."""
    start = time.perf_counter()
    opened = source.open()
    spec = export_table(opened.config, resolution)[stage]
    directory_path = Path(directory)
    graph = directory_path / f".{stage}.graph.onnx"
    key = graph_key(spec, opened.config, opened.t5_config, compute, OPSET)
    cache = GraphCache(cache_dir) if cache_dir else None
    stats: dict[str, Any] = {"graph_key": key}
    try:
        if cache is not None and cache.fetch(key, graph):
            stats["graph"] = "cache"
            traced = cleaned = time.perf_counter()
        else:
            network = opened.build(spec.network)
            if compute == "fp16":
                network = network.half()
            export_graph(stage_module(stage, network), spec, graph, verbose=verbose)
            traced = time.perf_counter()
            stats.update(clean_graph(graph, spec, OPSET, fp16=compute == "fp16"))
            cleaned = time.perf_counter()
            stats["graph"] = "traced"
            if cache is not None:
                cache.store(key, graph)
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


def _worker_init(verbose: bool) -> None:
    """A spawned export worker: one torch thread (the workers are the parallelism), the parent's
    verbosity (spawned processes do not inherit logging configuration)."""
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


# ---------------------------------------------------------------------------------------- checks

def _check_options(options: ExportOptions, table_names: tuple[str, ...]) -> tuple[str, ...]:
    if options.precision not in PRECISIONS:
        raise ExportInputError(f"precision {options.precision!r}: allowed {list(PRECISIONS)}")
    if options.jobs is not None and options.jobs < 1:
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

def _job_count(options: ExportOptions, to_trace: int) -> int:
    if options.jobs is not None:
        return options.jobs
    return max(1, min(available_cores(), to_trace))


def _exported_stages(source: ExportSource, jobs: list[tuple[str, str]], workers: int, tmp: Path,
                     options: ExportOptions) -> Iterator[tuple[str, dict[str, Any]]]:
    """(stage, result) of every job, in the order they finish; inline when one worker suffices."""
    if workers == 1 or len(jobs) == 1:
        for stage, compute in jobs:
            yield stage, export_stage(source, stage, compute, str(tmp), options.graph_cache, options.verbose,
                                      options.resolution)
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init,
                             initargs=(options.verbose,)) as pool:
        futures = {pool.submit(export_stage, source, stage, compute, str(tmp), options.graph_cache,
                               options.verbose, options.resolution): stage for stage, compute in jobs}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _parity_covers(summary: StageParity, labels: tuple[str, ...]) -> bool:
    """Whether a stage's recorded parity cases include every shape label asked for."""
    covered = {part.split("#")[0] for case in summary.cases for part in case.shape.split("=")}
    return set(labels) <= covered


def _reusable_stages(out_dir: Path, draft: ExportManifest, table: StageTable, keys: dict[str, str],
                     options: ExportOptions) -> dict[str, tuple[Path, ExportManifest, StageParity | None]]:
    """Stages an export beside ``out_dir`` holds identically: same weights digest and opset, same compute
    precision and graph key (so the same graph with the same weights streamed in)."""
    found: dict[str, tuple[Path, ExportManifest, StageParity | None]] = {}
    if not out_dir.parent.is_dir():
        return found
    for sibling in sorted(out_dir.parent.iterdir()):
        if (sibling == out_dir or sibling.name.startswith(".") or sibling.name.endswith(".rejected")
                or not (sibling / "manifest.json").is_file()):
            continue
        try:
            manifest = ExportManifest.read(sibling)
        except ExportManifestError:
            continue
        if manifest.source.get("digest") != draft.source.get("digest") or manifest.opset != draft.opset:
            continue
        parities = _read_parity(sibling)
        for stage, key in keys.items():
            entry = manifest.stages.get(stage)
            if stage in found or entry is None or manifest.stats.get(stage, {}).get("graph_key") != key:
                continue
            if entry.compute_precision != options.compute_precision(table[stage].network):
                continue
            try:
                manifest.verify_files(sibling, [stage])
            except ExportManifestError:
                continue
            parity = parities.get(stage)
            usable = parity if parity is not None and parity.passed and _parity_covers(
                parity, options.parity_shapes) else None
            found[stage] = (sibling, manifest, usable)
    return found


def _read_parity(directory: Path) -> dict[str, StageParity]:
    try:
        data = json.loads((directory / "parity.json").read_text())
        return {item["stage"]: StageParity(item["stage"], item["precision"], item["threshold"],
                                           [CaseResult(**case) for case in item["cases"]], item["skipped"])
                for item in data}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _link_stage(sibling: Path, entry: StageEntry, tmp: Path) -> None:
    for name in entry.files:
        try:
            os.link(sibling / name, tmp / name)
        except OSError:
            shutil.copy2(sibling / name, tmp / name)


def _stage_line(stage: str, compute: str, stats: dict[str, Any], parity: StageParity | None,
                parity_seconds: float | None) -> str:
    if stats.get("graph") == "reused":
        how = f"reused from {stats['reused_from']}"
    else:
        graph = "graph from cache" if stats.get("graph") == "cache" else (
            f"trace {stats['seconds_trace']:.1f} s, clean {stats['seconds_clean']:.1f} s")
        how = f"{graph}, weights {stats['seconds_weights']:.1f} s"
    total = sum(stats.get(k, 0.0) for k in ("seconds_trace", "seconds_clean", "seconds_weights"))
    if parity is None:
        checked = "parity not checked"
    elif parity.skipped:
        checked = f"parity skipped ({parity.skipped})"
    else:
        worst_rel = max(c.max_rel for c in parity.cases)
        worst_cos = min(c.cosine for c in parity.cases)
        timing = "recorded" if parity_seconds is None else f"{parity_seconds:.1f} s"
        checked = (f"parity {timing} at {len(parity.cases)} shapes: max rel {worst_rel:.2e}, cosine "
                   f"{worst_cos:.7f}{'' if parity.passed else ' OVER THRESHOLD'}")
        total += parity_seconds or 0.0
    return f"{stage} ({compute}) {total:.1f} s: {how}; {checked}"


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
    default_file_mode(tmp / NULL_EMBEDDINGS_FILE)  # safetensors writes 0600


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
                                                       table.resolution.max],
               # the architecture (configs.json form, T5 config): `kvt build` plans memory from it
               "configs": opened.config.to_dict(), "t5": t5_architecture(opened.t5_config)},
        source={**source.describe(), **opened.digest()}, tools=tool_versions(),
        options={"fp16_movq": options.fp16_movq, "softmax": "graph",
                 "compute": {table[s].network: options.compute_precision(table[s].network) for s in stages}},
        stages={s: None for s in stages},  # type: ignore[misc]  # identity needs the names only
    )
    existing = _check_out_dir(out_dir, draft, options.overwrite)
    if existing is not None:
        report(f"{out_dir} already holds this export (same weights, precision, opset and stages): reusing it")
        return existing
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _check_disk(out_dir, _estimated_bytes(opened, stages, table, options))

    keys = {stage: graph_key(table[stage], opened.config, opened.t5_config,
                             options.compute_precision(table[stage].network), OPSET) for stage in stages}
    reusable = _reusable_stages(out_dir, draft, table, keys, options) if options.reuse_stages else {}
    cache = GraphCache(options.graph_cache) if options.graph_cache else None
    jobs = [(stage, options.compute_precision(table[stage].network)) for stage in stages if stage not in reusable]
    to_trace = [stage for stage, _ in jobs if cache is None or not cache.has(keys[stage])]
    # Longest first (the U-Nets to trace), so parallel workers finish together.
    jobs.sort(key=lambda job: (job[0] not in to_trace, table[job[0]].network not in UNET_NETWORKS))
    workers = _job_count(options, len(to_trace))
    report(_plan_line(source, options, len(stages), reusable, to_trace, len(jobs), workers, cache))

    start = time.perf_counter()
    tmp = temporary_dir_beside(out_dir)
    try:
        draft.stages, draft.stats = {}, {}
        parities: dict[str, StageParity] = {}
        for stage, (sibling, manifest, parity) in reusable.items():
            _link_stage(sibling, manifest.stages[stage], tmp)
            draft.stages[stage] = manifest.stages[stage]
            draft.stats[stage] = {**manifest.stats[stage], "graph": "reused", "reused_from": sibling.name,
                                  "seconds_trace": 0.0, "seconds_clean": 0.0, "seconds_weights": 0.0}
            if parity is not None:
                parities[stage] = parity
            elif options.parity_shapes:
                parities[stage] = _timed_parity(opened, table, stage, tmp, draft, options)[0]
            report(_stage_line(stage, draft.stages[stage].compute_precision, draft.stats[stage],
                               parities.get(stage), None))
        with third_party_quiet(options.verbose):
            for stage, result in _exported_stages(source, jobs, workers, tmp, options):
                entry = result["entry"]
                draft.stages[stage] = StageEntry.from_spec(table[stage], entry["file"], entry["external_data"],
                                                           entry["compute_precision"])
                draft.stages[stage].files = entry["files"]
                draft.stats[stage] = result["stats"]
                seconds = None
                if options.parity_shapes:
                    parities[stage], seconds = _timed_parity(opened, table, stage, tmp, draft, options)
                report(_stage_line(stage, entry["compute_precision"], result["stats"], parities.get(stage),
                                   seconds))
        draft.stages = {stage: draft.stages[stage] for stage in stages}
        draft.stats = {stage: draft.stats[stage] for stage in stages}
        _write_assets(opened, tmp)
        parity_ok = True
        if options.parity_shapes:
            ordered = [parities[stage] for stage in stages]
            draft.parity = write_report(ordered, tmp, f"{source.label} {options.precision}")
            parity_ok = all(p.passed or p.skipped for p in ordered)
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
    report(f"wrote {len(stages)} stage(s) to {out_dir} in {time.perf_counter() - start:.1f} s")
    return draft


def _timed_parity(opened: OpenedSource, table: StageTable, stage: str, tmp: Path, draft: ExportManifest,
                  options: ExportOptions) -> tuple[StageParity, float]:
    began = time.perf_counter()
    result = stage_parity(opened, table, stage, tmp / draft.stages[stage].file,
                          draft.stages[stage].compute_precision, options.parity_shapes)
    return result, time.perf_counter() - began


def _plan_line(source: ExportSource, options: ExportOptions, total: int, reusable: dict[str, Any],
               to_trace: list[str], jobs: int, workers: int, cache: GraphCache | None) -> str:
    parts = []
    if reusable:
        parts.append(f"{len(reusable)} reused from {sorted({v[0].name for v in reusable.values()})}")
    if cache is not None and jobs > len(to_trace):
        parts.append(f"{jobs - len(to_trace)} graph(s) from the cache")
    if to_trace:
        parts.append(f"{len(to_trace)} to trace (about a minute or more each for a U-Net on a CPU core)")
    how = f"{workers} worker processes" if workers > 1 and jobs > 1 else "in this process"
    checks = (f"parity at {','.join(options.parity_shapes)}" if options.parity_shapes else "no parity check")
    return (f"{total} stage(s) of {source.label!r}, {options.precision}: {'; '.join(parts) or 'nothing to do'}"
            f" ({how}; {checks})")
