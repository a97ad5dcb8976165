"""The subcommands' work: run the benchmarks, then write JSON, Markdown and plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from kvt.benchmarks import report
from kvt.benchmarks.e2e_bench import E2EResult, RequestSettings, compare_outputs, run_e2e
from kvt.benchmarks.flops import (
    achieved,
    device_peak,
    meta_stage_modules,
    stage_call_flops,
    stage_precision,
    text_work_flops,
)
from kvt.benchmarks.sources import iter_pipelines
from kvt.benchmarks.stage_bench import FlopCache, bench_stage_calls, benchmark_calls
from kvt.benchmarks.triton_bench import bench_concurrency, tritonclient_sender
from kvt.contract.errors import UserError
from kvt.contract.plan import request_plan
from kvt.runtime.fast_path import FastPathOptions
from kvt.runtime.loading import PipelineSource
from kvt.runtime.pipeline import VideoOutput

EXIT_OK = 0


def _finish(out: Path, name: str, data: dict, markdown: str) -> int:
    report.write_json_atomic(out / f"{name}.json", data)
    report.write_text_atomic(out / f"{name}.md", markdown + "\n")
    print(markdown)
    plots = sorted(p.name for p in out.glob(f"{name}*.png"))
    print(f"\nwrote {out / name}.json, {name}.md" + (f", {', '.join(plots)}" if plots else ""))
    return EXIT_OK


def _speedup(base: float | None, fast: float | None) -> str:
    return f"{base / fast:.2f}x" if base and fast else "-"


# ------------------------------------------------------------------------------------------ stage

def stage_command(source: PipelineSource, pipelines: list[str], options: FastPathOptions, width: int,
                  height: int, fps_modes: list[str], stages: list[str] | None, warmup: int,
                  iterations: int, out: Path, name: str | None, onnx_dir: str | None) -> int:
    device = source.device
    peak = device_peak(device)
    info = report.provenance(device)
    calls = benchmark_calls(width, height, fps_modes)
    if stages:
        calls = [c for c in calls if c.stage in stages]
    results: dict[str, list] = {}
    caches: dict[object, FlopCache] = {}  # the same networks: count once per form (cuts or official)
    for pipe_name, pipeline in iter_pipelines(pipelines, source, options, onnx_dir):
        key = FlopCache.key_of(pipeline.backend)
        if key not in caches:
            caches[key] = FlopCache.for_backend(pipeline.backend)
        flops = caches[key]
        results[pipe_name] = bench_stage_calls(pipeline.backend, calls, peak, warmup, iterations, flops)
        del pipeline
    name = name or f"stage_{source.preset_name}_{width}x{height}_{device.type}"
    rows = []
    labels = [f"{c.stage} {','.join(f'{k}={v}' for k, v in c.dims.items())}" for c in calls]
    for index, label in enumerate(labels):
        row = [label]
        for pipe_name in pipelines:
            r = results[pipe_name][index]
            row += [f"{report.ms(r.latency.median)} ({report.ms(r.latency.p10)}-{report.ms(r.latency.p90)})",
                    report.fmt(r.tflops, ".3f"), report.fmt(None if r.mfu is None else 100 * r.mfu, ".1f")]
        first = results[pipelines[0]][index]
        row.insert(1, report.fmt(None if first.flops is None else first.flops / 1e9, ",.2f"))
        if "baseline" in results and "fast" in results:
            row.append(_speedup(results["baseline"][index].latency.median, results["fast"][index].latency.median))
        rows.append(row)
    header = ["stage call", "GFLOP"]
    for pipe_name in pipelines:
        header += [f"{pipe_name} ms median (p10-p90)", f"{pipe_name} TFLOP/s", f"{pipe_name} MFU %"]
    if "baseline" in results and "fast" in results:
        header.append("speed-up")
    markdown = "\n\n".join([
        f"## Per-stage latency: {source.describe()}, {width}x{height}, {peak.name}",
        report.provenance_markdown(info),
        f"- {warmup} warm-up + {iterations} timed calls per row ({results[pipelines[0]][0].latency.clock}); "
        + (f"MFU against the data sheet's dense peak of each stage's precision ({peak.datasheet} TFLOP/s)."
           if peak.dense_fp16_tflops else "MFU n/a: no data-sheet peak for this device."),
        report.markdown_table(header, rows)])
    report.plot_bars(out / f"{name}.png", f"stage latency, {source.preset_name} {width}x{height}, {peak.name}",
                     labels, {p: [r.latency.median * 1e3 for r in results[p]] for p in pipelines},
                     "median latency (ms)", log=True)
    data = {"provenance": info, "source": source.describe(), "width": width, "height": height,
            "device_peak": peak.__dict__, "options": repr(options),
            "results": {p: [r.to_dict() for r in rs] for p, rs in results.items()}}
    return _finish(out, name, data, markdown)


# ------------------------------------------------------------------------------------------ e2e

def _plan_flops(cache: FlopCache, table, width: int, height: int, fps: str, steps) -> dict[str, int | None]:
    """Total FLOPs per stage of one request (stage calls of request_plan at their shapes)."""
    totals: dict[str, int | None] = {}
    for call in request_plan(width, height, fps, False, *steps):
        spec = table[call.stage]
        count = cache(call.stage, spec.sample_inputs(call.dims), spec.input_names)
        so_far = totals.get(call.stage, 0)
        if count is None or so_far is None:
            totals[call.stage] = None
        else:
            totals[call.stage] = so_far + count * call.calls
    return totals


def _video(result: E2EResult) -> VideoOutput:
    """The video of a :func:`run_e2e` result (which always keeps it)."""
    assert result.output is not None
    return result.output


def _e2e_table(result: E2EResult, flops: dict[str, int | None], peak, precisions: dict[str, str]) -> str:
    rows = []
    for stage, entry in result.stages.items():
        total: float | None = flops.get(stage)
        if stage == "text_encoder" and total is not None:
            total *= entry["calls"]
        tflops, mfu = (achieved(total, entry["seconds"], peak, precisions.get(stage, "fp16")) if total
                       else (None, None))
        rows.append([stage, entry["calls"], f"{entry['seconds']:.3f} s", f"{100 * entry['seconds'] / result.wall_s:.1f}%",
                     report.fmt(tflops, ".3f"), report.fmt(None if mfu is None else 100 * mfu, ".1f")])
    rows.append(["runtime (outside stage calls)", "-", f"{result.outside_stages_s:.3f} s",
                 f"{100 * result.overhead_fraction:.2f}%", "-", "-"])
    rows.append(["**total**", sum(e["calls"] for e in result.stages.values()), f"**{result.wall_s:.3f} s**",
                 "100%", "-", "-"])
    return report.markdown_table(["stage", "calls", "latency", "share", "TFLOP/s", "MFU % (own precision)"], rows)


def e2e_command(source: PipelineSource, pipelines: list[str], options: FastPathOptions, width: int,
                height: int, fps_modes: list[str], steps: tuple[int, int, int], warmup_steps: int | None,
                out: Path, name: str | None, onnx_dir: str | None) -> int:
    device = source.device
    peak = device_peak(device)
    info = report.provenance(device)
    settings = RequestSettings(width=width, height=height, seed=source.seed, key_frame_steps=steps[0],
                               base_frame_steps=steps[1], interpolation_steps=steps[2])
    results: dict[tuple[str, str], E2EResult] = {}
    flop_totals: dict[str, dict] = {}  # fps -> stage -> FLOPs (per pipeline: "fps/pipeline")
    caches: dict[object, FlopCache] = {}
    precisions: dict[str, dict[str, str]] = {}
    for pipe_name, pipeline in iter_pipelines(pipelines, source, options, onnx_dir):
        key = FlopCache.key_of(pipeline.backend)
        if key not in caches:
            caches[key] = FlopCache.for_backend(pipeline.backend)
        modules = getattr(pipeline.backend, "modules", None)
        precisions[pipe_name] = {s: stage_precision(modules, s) for s in pipeline.table.names}
        for fps in fps_modes:
            results[(pipe_name, fps)] = run_e2e(pipeline, pipe_name, settings, fps, warmup_steps)
            flop_totals[f"{fps}/{pipe_name}"] = _plan_flops(caches[key], pipeline.table, width, height, fps, steps)
        del pipeline
    name = name or f"e2e_{source.preset_name}_{width}x{height}_{device.type}"
    sections = [f"## End-to-end generation: {source.describe()}, {width}x{height}, {peak.name}",
                report.provenance_markdown(info),
                f"- Steps (key frame, base frames, interpolation): {steps}; one warm-up request per fps mode "
                f"({warmup_steps} steps) before the timed one; text-to-video (no input image).",
                "### Summary",
                report.markdown_table(
                    ["pipeline", "fps", "frames", "wall s", "runtime overhead", "loop overhead", "T5 runs",
                     "peak RSS GiB", "CUDA max alloc GiB"],
                    [[r.pipeline, r.fps, _video(r).num_frames, f"{r.wall_s:.3f}", f"{100 * r.overhead_fraction:.2f}%",
                      f"{100 * r.loop_overhead_fraction:.2f}%", r.prompt_encodings,
                      f"{r.memory['rss_peak_bytes'] / 2**30:.2f}",
                      "-" if r.memory["cuda_max_allocated_bytes"] is None
                      else f"{r.memory['cuda_max_allocated_bytes'] / 2**30:.2f}"] for r in results.values()])]
    comparisons = {}
    if "baseline" in pipelines and "fast" in pipelines:
        rows = []
        for fps in fps_modes:
            base, fast = results[("baseline", fps)], results[("fast", fps)]
            errors = compare_outputs(_video(fast), _video(base))
            comparisons[fps] = errors
            rows.append([fps, f"{base.wall_s:.3f}", f"{fast.wall_s:.3f}", _speedup(base.wall_s, fast.wall_s),
                         f"{errors['latent_max_abs']:.2e}", f"{errors['latent_rel_l2']:.2e}",
                         f"{errors['latent_cosine']:.6f}", errors["frames_max_abs"],
                         f"{errors['frames_mean_abs']:.3f}", f"{errors['frames_psnr_db']:.1f}"])
        sections += ["### Fast path vs official-style baseline (same weights, same seed)",
                     report.markdown_table(["fps", "baseline s", "fast s", "speed-up", "latent max abs",
                                            "latent rel L2", "latent cosine", "frames max abs (uint8)",
                                            "frames mean abs", "PSNR dB"], rows)]
    for (pipe_name, fps), result in results.items():
        sections += [f"### {pipe_name}, fps {fps} ({_video(result).num_frames} frames)",
                     _e2e_table(result, flop_totals.get(f"{fps}/{pipe_name}", {}), peak, precisions[pipe_name])]
    markdown = "\n\n".join(sections)
    stage_names = sorted({s for r in results.values() for s in r.stages})
    labels = [f"{p} {f}" for p, f in results]
    parts = {s: [r.stages.get(s, {"seconds": 0.0})["seconds"] for r in results.values()] for s in stage_names}
    parts["runtime (outside stages)"] = [max(r.outside_stages_s, 0.0) for r in results.values()]
    report.plot_stacked(out / f"{name}.png", f"end-to-end by stage, {source.preset_name} {width}x{height}, {peak.name}",
                        labels, parts, "seconds per request")
    data = {"provenance": info, "source": source.describe(), "width": width, "height": height,
            "steps": steps, "warmup_steps": warmup_steps, "device_peak": peak.__dict__, "options": repr(options),
            "results": [r.to_dict() for r in results.values()], "fast_vs_baseline": comparisons,
            "flops_per_request": flop_totals}
    return _finish(out, name, data, markdown)


# ------------------------------------------------------------------------------------------ flops

def _count(modules, table, call, counter=stage_call_flops) -> tuple[int | None, str]:
    try:
        return counter(modules, table, call.stage, call.dims, device="meta"), ""
    except (RuntimeError, NotImplementedError) as exc:
        return None, f"not countable on the meta device ({str(exc).splitlines()[0][:60]})"


def _pct(before: float | None, after: float | None) -> str:
    return f"{100 * (after - before) / before:+.1f}%" if before and after is not None else "-"


def flops_command(preset: str, width: int, height: int, out: Path, name: str | None) -> int:
    """FLOPs per stage call and per request, in the official per-row form and with the exact cuts."""
    official, table = meta_stage_modules(preset, cuts=False)
    modules, _ = meta_stage_modules(preset, cuts=True)
    rows, data = [], {}
    fps_modes = ("low", "medium", "high")
    per_fps = {fps: {"official": 0, "cuts": 0, "cuts_hoisted": 0} for fps in fps_modes}
    for call in benchmark_calls(width, height):
        before, note = _count(official, table, call)
        after, _ = _count(modules, table, call)
        text, _ = _count(modules, table, call, text_work_flops)
        spec = table[call.stage]
        payload = spec.input_bytes(call.dims)
        key = f"{call.stage} {dict(call.dims)}"
        data[key] = {"official": before, "cuts": after, "text_work": text, "input_bytes": payload}
        rows.append([call.stage, ", ".join(f"{k}={v}" for k, v in call.dims.items()),
                     "n/a" if before is None else f"{before / 1e12:.3f}",
                     "n/a" if after is None else f"{after / 1e12:.3f}", _pct(before, after),
                     "-" if not text else f"{text / 1e12:.4f}", f"{payload / 1e6:.2f}", note])
        for fps in fps_modes:
            for planned in request_plan(width, height, fps, False):
                if planned.stage == call.stage and dict(planned.dims) == dict(call.dims) and before and after:
                    per_fps[fps]["official"] += before * planned.calls
                    per_fps[fps]["cuts"] += after * planned.calls
                    # Hoisted: the text work once per loop (each plan entry of a loop stage is one loop).
                    per_fps[fps]["cuts_hoisted"] += (after - (text or 0)) * planned.calls + (text or 0)
    name = name or f"flops_{preset}_{width}x{height}"
    info = report.provenance(torch.device("meta"))
    request_rows = [[fps, f"{v['official'] / 1e15:.3f}", f"{v['cuts'] / 1e15:.3f}", _pct(v["official"], v["cuts"]),
                     f"{v['cuts_hoisted'] / 1e15:.3f}", _pct(v["official"], v["cuts_hoisted"])]
                    for fps, v in per_fps.items()]
    markdown = "\n\n".join([
        f"## FLOPs per stage call: preset {preset}, {width}x{height} (torch flop counter, meta device)",
        report.provenance_markdown(info),
        "- *official form*: every row computes its own copy of the text work and the interpolation U-Net "
        "runs its temporal layers on every row (the official code, the stage modules with `cuts=False`); "
        "*with cuts*: the stage contract's distinct contexts, text work once per context, the null rows' "
        "cross-attention as a constant, temporal layers on the conditional half only (exact up to float "
        "reassociation). *Text work* is the part of a call that depends on the text alone; hoisting "
        "computes it once per sampler loop. *Input MB*: the bytes one call's inputs take (stage table).",
        report.markdown_table(["stage", "dims", "TFLOP official form", "TFLOP with cuts", "change",
                               "text work TFLOP", "input MB per call", "note"], rows),
        report.markdown_table(["fps", "PFLOP per request, official form", "with cuts", "change",
                               "with cuts + text hoisted per loop", "change"], request_rows),
        "Per text-to-video request, official steps; the text encoder is excluded where the meta device "
        "cannot count it."])
    return _finish(out, name, {"provenance": info, "per_call": data, "per_request": per_fps}, markdown)


# ------------------------------------------------------------------------------------------ triton

def triton_command(url: str, protocol: str, model: str, levels: Sequence[int], requests: int, warmup: int,
                   prompt: str, seed: int, width: int, height: int, fps: str, steps: tuple[int, int, int],
                   inprocess_json: str | None, out: Path, name: str | None) -> int:
    make_sender = tritonclient_sender(url, protocol, model, prompt=prompt, seed=seed, width=width, height=height,
                                      fps=fps, key_frame_steps=steps[0], base_frame_steps=steps[1],
                                      interpolation_steps=steps[2])
    info = report.provenance(torch.device("cpu"))
    results = bench_concurrency(make_sender, levels, requests, warmup)
    reference = None
    if inprocess_json:
        saved = json.loads(Path(inprocess_json).read_text())
        matches = [r for r in saved["results"] if r["fps"] == fps]
        if not matches:
            raise UserError(f"--inprocess-json {inprocess_json}: no result for fps {fps!r}")
        reference = matches[-1]["wall_s"]
    rows = [[r.concurrency, r.requests, report.ms(r.latency.median), report.ms(r.latency.p10), report.ms(r.latency.p90),
             f"{r.throughput_rps:.3f}",
             "-" if reference is None or r.concurrency != 1 else f"{r.latency.median / reference:.3f}x"]
            for r in results]
    name = name or f"triton_{protocol}_{width}x{height}_{fps}"
    markdown = "\n\n".join([
        f"## Triton client latency: model {model} at {url} ({protocol}), {width}x{height}, fps {fps}, steps {steps}",
        report.provenance_markdown(info),
        report.markdown_table(["concurrency", "requests", "latency ms median", "p10", "p90", "throughput req/s",
                               "vs in-process"], rows)])
    report.plot_bars(out / f"{name}.png", f"Triton {model} ({protocol}) throughput", [str(r.concurrency) for r in results],
                     {"requests/s": [r.throughput_rps for r in results]}, "requests per second")
    data = {"provenance": info, "url": url, "protocol": protocol, "model": model, "inprocess_wall_s": reference,
            "results": [r.to_dict() for r in results]}
    return _finish(out, name, data, markdown)
