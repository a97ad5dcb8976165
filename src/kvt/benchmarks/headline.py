"""``kvt bench headline``: one time-boxed command for a first GPU session (one H100 / H200, torch only).

Runs, in order, each phase skipped when the budget is spent and its results written to
``OUT/headline.json`` and ``OUT/headline.md`` as soon as it ends (an interrupted run keeps what it has):

1. ``env``: the machine and the switches that decide kernels (benchmarks/environment.py);
2. ``calibrate``: dense GEMM TFLOP/s per precision and device copy GB/s (the measured ceilings);
3. ``attention``: every distinct attention shape of a request, the SDPA backend torch picks for it here
   and its latency (the MoVQ's wide heads also in the plain two-GEMM form);
4. ``models``: the preset's networks built on the meta device and drawn on the device (seconds);
5. ``e2e``: the official-style baseline, then the fast path, at the request size (default 512x512, fps
   medium, official steps): wall time, per-stage seconds and MFU (against each stage's precision, data
   sheet and measured), peak memory, T5 runs, speed-up and output agreement;
6. ``stages``: per-stage latency of the fast path with each GPU-hygiene switch flipped on its own (and the
   baseline): the A/B behind every default of :class:`FastPathOptions`;
7. ``movq_precision``: one video-decoder chunk in float32 and bfloat16, in both layouts, and the PSNR of
   bfloat16 against float32 on the e2e run's own latents;
8. ``groupnorm``: a video U-Net call with GroupNorm on half inputs natively vs the float32 round trip.

Without an install: ``PYTHONPATH=src python -m kvt.benchmarks.headline --out DIR`` imports only what the
benchmark needs (torch, numpy, transformers, diffusers, Pillow, tqdm). The CPU dry run
(``--preset tiny --device cpu``) is part of the test suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvt.benchmarks import report
from kvt.benchmarks.e2e_bench import E2EResult, RequestSettings, compare_outputs, run_e2e
from kvt.benchmarks.environment import attention_census, calibrate, environment, record_attention_shapes
from kvt.benchmarks.flops import (
    DevicePeak,
    achieved,
    device_peak,
    meta_stage_modules_for,
    stage_precision,
)
from kvt.benchmarks.stage_bench import FlopCache, distinct_calls
from kvt.benchmarks.timing import measure, synchronize
from kvt.contract.errors import KvtError, UnavailableError, UserError, exit_code
from kvt.contract.plan import request_plan
from kvt.contract.stages import FPS_FRAMES
from kvt.models.attention_kernels import auto_choices
from kvt.models.model_set import KandinskyVideoModels
from kvt.models.norms import native_group_norm
from kvt.models.presets import get_preset
from kvt.models.registry import networks_of_family
from kvt.models.stage_modules import stage_table_for
from kvt.runtime.backends.base import StageBackend
from kvt.runtime.fast_path import (
    FastPathOptions,
    FastTorchBackend,
    build_baseline_pipeline,
    build_fast_pipeline,
    converted_copy,
    models_with_precision,
    to_memory_format_,
)
from kvt.runtime.images import psnr_db, to_uint8_tensor
from kvt.runtime.loading import PipelineSource, open_models
from kvt.runtime.pipeline import KandinskyVideoPipeline

PHASES = ("env", "calibrate", "attention", "models", "e2e", "stages", "movq_precision", "groupnorm")
# Seconds each phase is expected to take for the full preset at 512x512 on an H100 / H200 (the review's
# estimates, rounded up); a phase starts only while the budget left covers its estimate. Other presets
# and CPU dry runs are small by construction: there only the budget itself stops phases.
FULL_SIZE_ESTIMATES_S = {"env": 10, "calibrate": 20, "attention": 30, "models": 60, "e2e": 120,
                         "stages": 150, "movq_precision": 30, "groupnorm": 10}
# The baseline holds a float32 T5 beside the fast path's bfloat16 one (72.5 GB of weights at full
# size): only on a device with at least this much memory; below it the baseline shares the bfloat16 T5.
FP32_T5_MIN_DEVICE_GIB = 100
DIFFUSERS_HINT = ("the samplers need diffusers (pure Python): `pip install --no-deps diffusers==0.42.1`, or "
                  "offline copy diffusers-0.42.1-py3-none-any.whl here and put the wheel itself on PYTHONPATH "
                  "(PYTHONPATH=src:/path/diffusers-0.42.1-py3-none-any.whl; Python imports a pure wheel as a zip)")
REQUIRED = {"transformers": "pip install --no-deps 'transformers>=5,<6'", "PIL": "pip install pillow",
            "tqdm": "pip install tqdm", "numpy": "pip install numpy"}


@dataclass(frozen=True)
class HeadlineSettings:
    preset: str = "full"
    device: str = "cuda"
    width: int = 512
    height: int = 512
    fps: str = "medium"
    steps: tuple[int, int, int] = (50, 50, 10)
    warmup_steps: int = 2
    budget_s: float = 540.0
    iterations: int = 5
    seed: int = 0
    phases: tuple[str, ...] = PHASES


# ------------------------------------------------------------------------------------------ the run

@dataclass
class _State:
    """What phases hand each other: models, pipelines, measured ceilings, the e2e video."""

    settings: HeadlineSettings
    device: torch.device
    peak: DevicePeak
    models: KandinskyVideoModels | None = None
    baseline_t5: torch.dtype = torch.float32
    latents: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Headline:
    """Runs the phases within the budget and saves after each."""

    def __init__(self, settings: HeadlineSettings, out: Path) -> None:
        self.settings = settings
        self.out = out
        self.started = time.monotonic()
        device = torch.device(settings.device)
        self.state = _State(settings, device, device_peak(device))
        self.record: dict[str, Any] = {"settings": {**dataclasses.asdict(settings)},
                                       "provenance": report.provenance(device), "phases": {}}

    def left_s(self) -> float:
        return self.settings.budget_s - (time.monotonic() - self.started)

    def estimate_s(self, phase: str) -> float:
        full = self.settings.preset == "full" and self.state.device.type == "cuda"
        return float(FULL_SIZE_ESTIMATES_S[phase]) if full else 0.0

    def run(self) -> dict[str, Any]:
        out: dict[str, Callable[[], dict[str, Any]]] = {
            "env": self._env, "calibrate": self._calibrate, "attention": self._attention,
            "models": self._models, "e2e": self._e2e, "stages": self._stages,
            "movq_precision": self._movq_precision, "groupnorm": self._groupnorm}
        for phase in PHASES:
            entry: dict[str, Any]
            if phase not in self.settings.phases:
                entry = {"status": "not requested"}
            elif self.left_s() <= self.estimate_s(phase) or self.left_s() <= 0:
                entry = {"status": "skipped", "reason": f"budget: {max(self.left_s(), 0):.0f} s left, the phase "
                                                        f"needs about {self.estimate_s(phase):.0f} s"}
            else:
                began = time.monotonic()
                try:
                    entry = {"status": "done", **out[phase]()}
                except _Skip as skip:
                    entry = {"status": "skipped", "reason": str(skip)}
                except Exception as exc:  # keep going: later phases may still work (OOM included)
                    entry = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc(limit=6)}
                entry["seconds"] = round(time.monotonic() - began, 2)
            self.record["phases"][phase] = entry
            self.save()
        return self.record

    def save(self) -> None:
        self.record["elapsed_s"] = round(time.monotonic() - self.started, 2)
        report.write_json_atomic(self.out / "headline.json", self.record)
        report.write_text_atomic(self.out / "headline.md", render_markdown(self.record) + "\n")

    # ---------------------------------------------------------------------------------- phases

    def _env(self) -> dict[str, Any]:
        return {"environment": environment(self.state.device), "datasheet_tflops": self.state.peak.datasheet}

    def _calibrate(self) -> dict[str, Any]:
        result = calibrate(self.state.device)
        self.state.peak = dataclasses.replace(self.state.peak, measured=dict(result["gemm_tflops"]))
        return result

    def _attention(self) -> dict[str, Any]:
        s, preset = self.settings, get_preset(self.settings.preset)
        modules = meta_stage_modules_for(preset.config)
        table = stage_table_for(preset.config)
        calls = [c for c in distinct_calls(request_plan(s.width, s.height, s.fps, False))
                 if c.stage in modules]
        shapes = record_attention_shapes(modules, table, calls)
        unet = _fast_unet_dtype(self.state.device)
        dtypes = {stage: (unet if stage.startswith("unet") else torch.float32) for stage in table.names}
        return {"shapes": attention_census(shapes, self.state.device, dtypes, self.settings.iterations)}

    def _models(self) -> dict[str, Any]:
        device = self.state.device
        began = time.monotonic()
        text_dtype = torch.float32
        if device.type == "cuda":
            gib = torch.cuda.get_device_properties(device).total_memory / 2**30
            if gib < FP32_T5_MIN_DEVICE_GIB:
                text_dtype = torch.bfloat16
        source = PipelineSource.preset(self.settings.preset, seed=self.settings.seed, device=device,
                                       init_on_device=device.type == "cuda")
        models = open_models(source)
        if text_dtype != torch.float32:
            models = models_with_precision(models, text_encoder=text_dtype)
        self.state.models, self.state.baseline_t5 = models, text_dtype
        synchronize(device)
        return {"seconds_build": round(time.monotonic() - began, 2), "source": models.source,
                "baseline_text_encoder": str(text_dtype).replace("torch.", ""),
                "parameters": {name: sum(p.numel() for p in module.parameters())
                               for name, module in models.networks().items()},
                "cuda_allocated_gib": (torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda"
                                       else None)}

    def _e2e(self) -> dict[str, Any]:
        models, s = self._need_models(), self.settings
        settings = RequestSettings(width=s.width, height=s.height, seed=s.seed, key_frame_steps=s.steps[0],
                                   base_frame_steps=s.steps[1], interpolation_steps=s.steps[2])
        results: dict[str, Any] = {}
        baseline = build_baseline_pipeline(models, text_encoder=self.state.baseline_t5)
        base = run_e2e(baseline, "baseline", settings, s.fps, s.warmup_steps)
        results["baseline"] = self._e2e_entry(base, baseline)
        del baseline
        fast_result, fast, note = self._fast_e2e(models, settings)
        results["fast"] = self._e2e_entry(fast_result, fast)
        if note:
            results["fast"]["note"] = note
        assert base.output is not None and fast_result.output is not None
        results["agreement"] = compare_outputs(fast_result.output, base.output)
        results["speedup"] = base.wall_s / fast_result.wall_s
        self.state.latents = fast_result.output.latents
        backend = fast.backend
        if isinstance(backend, FastTorchBackend):
            self.state.extra["fast_models"] = backend.models
            results["fast"]["chosen"] = {"memory_formats": backend.memory_formats,
                                         "movq_attention": auto_choices(),
                                         "options": repr(backend.options)}
        return results

    def _fast_e2e(self, models: KandinskyVideoModels,
                  settings: RequestSettings) -> tuple[E2EResult, KandinskyVideoPipeline, str | None]:
        s = self.settings
        fast = build_fast_pipeline(models)
        try:
            return run_e2e(fast, "fast", settings, s.fps, s.warmup_steps), fast, None
        except RuntimeError as exc:
            if not (isinstance(fast.backend, FastTorchBackend) and fast.backend.options.cuda_graphs):
                raise
            note = f"CUDA-graph capture failed ({type(exc).__name__}: {exc}); rerun without CUDA graphs"
            del fast
            fast = build_fast_pipeline(models, FastPathOptions(cuda_graphs=False))
            return run_e2e(fast, "fast", settings, s.fps, s.warmup_steps), fast, note

    def _e2e_entry(self, result: E2EResult, pipeline: KandinskyVideoPipeline) -> dict[str, Any]:
        s = self.settings
        backend = pipeline.backend
        flops = FlopCache.for_backend(backend)
        modules = getattr(backend, "modules", None)
        stages: dict[str, dict[str, Any]] = {}
        for call in request_plan(s.width, s.height, s.fps, False, *s.steps):
            spec = pipeline.table[call.stage]
            count = flops(call.stage, spec.sample_inputs(call.dims), spec.input_names)
            entry = stages.setdefault(call.stage, {"flops": 0})
            entry["flops"] = None if count is None or entry["flops"] is None else entry["flops"] + count * call.calls
        for stage, timing in result.stages.items():
            entry = stages.setdefault(stage, {"flops": None})
            entry.update(timing)
            precision = stage_precision(modules, stage)
            total = entry["flops"]
            if stage == "text_encoder" and total is not None:
                total *= timing["calls"]
            if total:
                tflops, mfu = achieved(total, timing["seconds"], self.state.peak, precision)
                entry.update({"precision": precision, "tflops": tflops, "mfu": mfu,
                              "mfu_measured": achieved(total, timing["seconds"], self.state.peak, precision,
                                                       measured=True)[1]})
        return {"wall_s": result.wall_s, "stages": stages, "phases": result.phases, "memory": result.memory,
                "t5_runs": result.prompt_encodings, "outside_stages_s": result.outside_stages_s,
                "device_free_gib": (torch.cuda.mem_get_info(self.state.device)[0] / 2**30
                                    if self.state.device.type == "cuda" else None)}

    def _stages(self) -> dict[str, Any]:
        models, s = self._need_models(), self.settings
        calls = [c for c in distinct_calls(request_plan(s.width, s.height, s.fps, False))
                 if c.stage != "text_encoder"]
        rows: dict[str, Any] = {}
        for variant, (options, stages) in stage_variants(self.state.device).items():
            if self.left_s() <= 0:
                rows[variant] = {"skipped": "budget"}
                continue
            wanted = [c for c in calls if stages is None or c.stage in stages]
            try:
                rows[variant] = self._time_variant(models, options, wanted)
            except Exception as exc:
                rows[variant] = {"error": f"{type(exc).__name__}: {exc}"}
            if self.state.device.type == "cuda":
                torch.cuda.empty_cache()
            self.record["phases"]["stages"] = {"status": "running", "variants": rows}
            self.save()
        return {"variants": rows}

    def _fast_models(self) -> KandinskyVideoModels:
        """The model set in the fast path's precisions (shared by every variant: no new copies)."""
        if "fast_models" not in self.state.extra:
            backend = build_fast_pipeline(self._need_models()).backend
            assert isinstance(backend, FastTorchBackend)
            self.state.extra["fast_models"] = backend.models
        models: KandinskyVideoModels = self.state.extra["fast_models"]
        return models

    def _time_variant(self, models: KandinskyVideoModels, options: FastPathOptions | None,
                      calls: Sequence[Any]) -> dict[str, Any]:
        backend: StageBackend
        if options is None:  # the official layout: NCHW weights
            for network in networks_of_family("unet") + networks_of_family("movq"):
                to_memory_format_(getattr(models, network), torch.contiguous_format)
            backend = build_baseline_pipeline(models, text_encoder=self.state.baseline_t5).backend
        else:
            backend = FastTorchBackend(self._fast_models(), options)
        out: dict[str, Any] = {}
        for call in calls:
            spec = backend.table[call.stage]
            inputs = spec.sample_inputs(call.dims, device=self.state.device, seed=self.settings.seed)
            with backend.loop_scope(call.stage) if spec.loop else _nothing():
                # One warm-up call: it autotunes (cudnn.benchmark), measures the layout and captures the
                # CUDA graph (CudaGraphCall warms up itself before capturing).
                stats = measure(functools.partial(backend.run, call.stage, inputs), self.state.device, warmup=1,
                                iterations=self.settings.iterations)
            out[f"{call.stage} {','.join(f'{k}={v}' for k, v in call.dims.items())}"] = 1e3 * stats.median
        if isinstance(backend, FastTorchBackend):
            out["_memory_formats"] = {k: v["chosen"] for k, v in backend.memory_formats.items()}
        return out

    def _movq_precision(self) -> dict[str, Any]:
        models = self._fast_models()
        device = self.state.device
        latents = self.state.latents
        if latents is None:  # no e2e run: a latent of the request's size
            latents = torch.randn(5, 4, self.settings.height // 8, self.settings.width // 8)
        chunk = latents[:5].to(device, torch.float32).contiguous()
        reference_net = models.video_movq
        rows = []
        frames = {}
        for dtype in (torch.float32, torch.bfloat16):
            network = reference_net if dtype == torch.float32 else converted_copy(reference_net, dtype)
            for layout in ("contiguous", "channels_last"):
                for bench in ((False, True) if device.type == "cuda" else (False,)):
                    backend = FastTorchBackend(dataclasses.replace(models, video_movq=network),
                                               FastPathOptions(channels_last=layout == "channels_last",
                                                               cudnn_benchmark=bench, movq_dtype=dtype,
                                                               cuda_graphs=False))
                    stats = measure(functools.partial(backend.run, "video_movq_decoder", {"latent": chunk}), device,
                                    warmup=1, iterations=max(2, self.settings.iterations // 2))
                    rows.append({"dtype": str(dtype).replace("torch.", ""), "layout": layout,
                                 "cudnn_benchmark": bench, "ms": 1e3 * stats.median})
                    frames[dtype] = backend.run("video_movq_decoder", {"latent": chunk})["frames"]
        psnr = psnr_db(to_uint8_tensor(frames[torch.bfloat16]), to_uint8_tensor(frames[torch.float32]))
        return {"frames": int(chunk.shape[0]), "latents": "e2e fast-path output" if self.state.latents is not None
                else "random", "timings": rows, "bf16_psnr_db": psnr}

    def _groupnorm(self) -> dict[str, Any]:
        s = self.settings
        if self.state.device.type != "cuda":
            raise _Skip("GroupNorm runs natively only for CUDA half inputs; on this device both paths are "
                        "the float32 round trip")
        backend = FastTorchBackend(self._fast_models(), FastPathOptions(cuda_graphs=False))
        spec = backend.table["unet_t2v_video"]
        inputs = spec.sample_inputs({"N": 36, "h": s.height // 8, "w": s.width // 8}, device=self.state.device)
        module = backend.modules["unet_t2v_video"]
        args = [inputs[n] for n in spec.input_names]
        with torch.inference_mode():
            with native_group_norm(False):
                reference = module(*args)
            with native_group_norm(True):
                native = module(*args)
        diff = (native.double() - reference.double()).abs()
        return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                "identical_fraction": float((native == reference).double().mean()),
                "bit_identical": bool(torch.equal(native, reference)), "ref_max_abs": float(reference.abs().max())}

    def _need_models(self) -> KandinskyVideoModels:
        if self.state.models is None:
            self.record["phases"].setdefault("models", {})
            self._models()
        assert self.state.models is not None
        return self.state.models


class _Skip(Exception):
    """A phase that does not apply here (recorded as skipped with the reason)."""


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _fast_unet_dtype(device: torch.device) -> torch.dtype:
    return FastPathOptions().resolved(device).unet_dtype or torch.float32


def stage_variants(device: torch.device) -> dict[str, tuple[FastPathOptions | None, frozenset[str] | None]]:
    """The A/B variants: (fast-path options or None for the baseline, the stages the switch touches)."""
    unets = frozenset({"unet_t2v_image", "unet_t2v_video", "unet_interp"})
    decoders = frozenset({"movq_decoder", "video_movq_decoder"})
    out: dict[str, tuple[FastPathOptions | None, frozenset[str] | None]] = {
        "baseline (official style)": (None, None),
        "fast (defaults)": (FastPathOptions(), None),
        "fast, official per-row form (no cuts)": (FastPathOptions(cuts=False), unets),
        "fast, text work every step (no hoisting)": (FastPathOptions(hoist_text=False), unets),
        "fast, NCHW weights": (FastPathOptions(channels_last=False), None),
        "fast, channels-last weights": (FastPathOptions(channels_last=True), None),
        "fast, GroupNorm float32 round trip": (FastPathOptions(native_group_norm=False), None),
        "fast, MoVQ attention sdpa": (FastPathOptions(movq_attention="sdpa"), decoders),
        "fast, MoVQ attention math": (FastPathOptions(movq_attention="math"), decoders),
    }
    if device.type == "cuda":
        out["fast, cudnn.benchmark off"] = (FastPathOptions(cudnn_benchmark=False), None)
        out["fast, no CUDA graphs"] = (FastPathOptions(cuda_graphs=False), unets)
    return out


# ------------------------------------------------------------------------------------------ markdown

def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def render_markdown(record: dict[str, Any]) -> str:
    settings, phases = record["settings"], record["phases"]
    prov = record["provenance"]
    lines = [f"## Headline benchmark: preset {settings['preset']}, {settings['width']}x{settings['height']} "
             f"fps {settings['fps']}, steps {tuple(settings['steps'])}, on {prov.get('gpu', prov['device'])}",
             f"- Date: {prov['date']}. Command: `{prov['command']}`. Budget {settings['budget_s']:.0f} s, "
             f"elapsed {record.get('elapsed_s', 0):.0f} s.",
             report.markdown_table(["phase", "status", "seconds", "note"],
                                   [[name, entry.get("status"), _fmt(entry.get("seconds"), ".1f"),
                                     entry.get("reason") or entry.get("error") or ""]
                                    for name, entry in phases.items()])]
    env = phases.get("env", {}).get("environment")
    if env:
        lines.append("### Environment\n\n```json\n" + json.dumps(env, indent=1) + "\n```")
    cal = phases.get("calibrate", {})
    if cal.get("status") == "done":
        lines.append(f"### Measured ceilings\n\nGEMM {cal['gemm_size']}^3: "
                     + ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in cal["gemm_tflops"].items())
                     + f"; device copy {cal['copy_gb_per_s']:.0f} GB/s (read + write).")
    att = phases.get("attention", {})
    if att.get("status") == "done":
        lines.append("### Attention census\n\n" + report.markdown_table(
            ["stage", "q", "k", "mask", "dtype", "backend", "sdpa ms", "math ms", "calls per stage call"],
            [[r["stage"], r["q"], r["k"], r["mask"], r["dtype"], r["backend"], _fmt(r["sdpa_ms"]),
              _fmt(r.get("math_ms")), r["calls_per_stage_call"]] for r in att["shapes"]]))
    e2e = phases.get("e2e", {})
    if e2e.get("status") == "done":
        rows = []
        for name in ("baseline", "fast"):
            for stage, entry in e2e[name]["stages"].items():
                rows.append([name, stage, entry.get("calls", "-"), _fmt(entry.get("seconds")),
                             entry.get("precision", "-"), _fmt(entry.get("tflops"), ".1f"),
                             _fmt(None if entry.get("mfu") is None else 100 * entry["mfu"], ".1f"),
                             _fmt(None if entry.get("mfu_measured") is None else 100 * entry["mfu_measured"], ".1f")])
        agreement = e2e["agreement"]
        lines.append(
            f"### End to end\n\nbaseline {e2e['baseline']['wall_s']:.2f} s, fast {e2e['fast']['wall_s']:.2f} s: "
            f"speed-up {e2e['speedup']:.2f}x; T5 runs {e2e['baseline']['t5_runs']} / {e2e['fast']['t5_runs']}; "
            f"peak allocated (GiB) {_gib(e2e['baseline']['memory'])} / {_gib(e2e['fast']['memory'])}; frames PSNR "
            f"{agreement['frames_psnr_db']:.1f} dB, latent rel L2 {agreement['latent_rel_l2']:.2e}.\n\n"
            + report.markdown_table(["pipeline", "stage", "calls", "seconds", "precision", "TFLOP/s",
                                     "MFU % (data sheet)", "MFU % (measured GEMM)"], rows))
    stages = phases.get("stages", {})
    if stages.get("variants"):
        variants = stages["variants"]
        columns = sorted({k for v in variants.values() for k in v if not k.startswith("_")} - {"error", "skipped"})
        rows = [[name, *[_fmt(v.get(c), ".1f") for c in columns], v.get("error") or v.get("skipped") or ""]
                for name, v in variants.items()]
        lines.append("### Per-stage A/B (ms per call, median)\n\n"
                     + report.markdown_table(["variant", *columns, "note"], rows))
    movq = phases.get("movq_precision", {})
    if movq.get("status") == "done":
        lines.append(f"### Video decoder precision (chunk of {movq['frames']} frames, {movq['latents']} latents)"
                     f"\n\nbfloat16 vs float32 PSNR {movq['bf16_psnr_db']:.1f} dB\n\n" + report.markdown_table(
                         ["dtype", "layout", "cudnn.benchmark", "ms"],
                         [[r["dtype"], r["layout"], r["cudnn_benchmark"], _fmt(r["ms"], ".1f")] for r in movq["timings"]]))
    gn = phases.get("groupnorm", {})
    if gn.get("status") == "done":
        lines.append(f"### GroupNorm on half inputs, native vs float32 round trip (video U-Net call)\n\n"
                     f"max |diff| {gn['max_abs']:.3g} (output max {gn['ref_max_abs']:.3g}), identical elements "
                     f"{100 * gn['identical_fraction']:.2f}%, bit-identical: {gn['bit_identical']}.")
    return "\n\n".join(lines)


def _gib(memory: dict[str, Any]) -> str:
    value = memory.get("cuda_max_allocated_bytes")
    return "-" if value is None else f"{value / 2**30:.1f}"


# ------------------------------------------------------------------------------------------ entry points

def check_requirements() -> None:
    """Fail early, saying what to install, when a package the run needs is missing."""
    if importlib.util.find_spec("diffusers") is None:
        raise UnavailableError(f"diffusers is not installed: {DIFFUSERS_HINT}")
    missing = [hint for module, hint in REQUIRED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UnavailableError("missing packages: " + "; ".join(missing))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="results folder (headline.json, headline.md)")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run (default 540)")
    p.add_argument("--preset", default="full", help="full (default), small or tiny (CPU dry run)")
    p.add_argument("--device", default="cuda", help="cuda[:N] (default) or cpu")
    p.add_argument("--width", type=int, help="frame width (default: 512 for full, else the preset's)")
    p.add_argument("--height", type=int, help="frame height (default: 512 for full, else the preset's)")
    p.add_argument("--fps", default="medium", choices=tuple(FPS_FRAMES), help="fps mode of the end-to-end requests (default medium)")
    p.add_argument("--steps", default="50,50,10", help="key-frame, base-frame, interpolation steps")
    p.add_argument("--iterations", type=int, default=5, help="timed calls per stage measurement")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {', '.join(PHASES)}")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0: torch's default)")


def settings_from(args: argparse.Namespace) -> HeadlineSettings:
    preset = get_preset(args.preset)
    try:
        steps = tuple(int(v) for v in args.steps.split(","))
    except ValueError:
        steps = ()
    if len(steps) != 3 or min(steps) < 1:
        raise UserError(f"--steps {args.steps!r}: three positive integers KEY,BASE,INTERP (e.g. 50,50,10)")
    phases = tuple(p.strip() for p in args.phases.split(",") if p.strip())
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise UserError(f"--phases: unknown {unknown}; allowed {', '.join(PHASES)}")
    if args.budget <= 0 or args.iterations < 1:
        raise UserError(f"--budget {args.budget} and --iterations {args.iterations} must be positive")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UnavailableError(f"--device {args.device}: torch {torch.__version__} sees no CUDA GPU here "
                               "(use --device cpu --preset tiny for a dry run)")
    default = (512, 512) if preset.name == "full" else (preset.default_width, preset.default_height)
    return HeadlineSettings(preset=preset.name, device=args.device, width=args.width or default[0],
                            height=args.height or default[1], fps=args.fps, steps=(steps[0], steps[1], steps[2]),
                            budget_s=args.budget, iterations=args.iterations, phases=phases)


def run_headline(args: argparse.Namespace) -> int:
    """``kvt bench headline``: returns 0 when every requested phase is done or skipped for the budget."""
    check_requirements()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = settings_from(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = Headline(settings, out).run()
    statuses = {name: entry["status"] for name, entry in record["phases"].items()}
    print(render_markdown(record))
    print(f"\nwrote {out / 'headline.json'}, {out / 'headline.md'}")
    return 0 if "failed" not in statuses.values() else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvt.benchmarks.headline", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_headline(args)
    except KvtError as error:
        print(f"headline: {error}", file=sys.stderr)
        return exit_code(error) or 1


if __name__ == "__main__":
    sys.exit(main())
