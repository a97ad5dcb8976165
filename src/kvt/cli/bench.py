"""``kvt bench``: stage, e2e, flops, headline and triton benchmarks.

Each subcommand writes ``<name>.json`` (figures + provenance), ``<name>.md`` (tables) and PNG plots to
``--out`` (default ``bench-results`` under the current directory) and prints the Markdown.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from kvt.benchmarks import commands, headline
from kvt.benchmarks.sources import parse_pipelines
from kvt.cli.common import UsageError, add_threads_option, parse_list, preset, threads
from kvt.contract.request import GenerationRequest
from kvt.contract.stages import FPS_FRAMES
from kvt.runtime.fast_path import FastPathOptions
from kvt.runtime.loading import PipelineSource

DEFAULT_OUT = Path("bench-results")
_DEFAULT_STEPS = (f"{GenerationRequest.key_frame_steps},{GenerationRequest.base_frame_steps},"
                  f"{GenerationRequest.interpolation_steps}")


def _common(p: argparse.ArgumentParser, pipelines: str) -> None:
    p.add_argument("--preset", default="tiny", help="tiny, small or full (random weights unless --weights)")
    p.add_argument("--weights", help="checkpoint directory in the official layout (overrides random weights)")
    p.add_argument("--text-encoder", help="Flan-UL2 folder for --weights")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the requests")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    add_threads_option(p)
    p.add_argument("--pipelines", default=pipelines,
                   help="comma-separated: baseline (official-style), fast, torch (reference), onnxruntime")
    p.add_argument("--onnx-dir", help="`kvt export` directory for --pipelines onnxruntime")
    p.add_argument("--width", type=int, help="frame width (default: the preset's)")
    p.add_argument("--height", type=int, help="frame height (default: the preset's)")
    p.add_argument("--compile", action="store_true", help="fast path: torch.compile the U-Net stages")
    p.add_argument("--no-cuda-graphs", action="store_true", help="fast path: no CUDA graph capture")
    p.add_argument("--no-channels-last", action="store_true", help="fast path: keep NCHW weights")
    p.add_argument("--fp32-text-encoder", action="store_true", help="fast path: T5 in FP32 instead of BF16")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results folder (default: ./bench-results)")
    p.add_argument("--name", help="base name of the result files (default: derived from the settings)")


def register(sub: argparse._SubParsersAction) -> None:
    """Register ``bench`` with its subcommands on an argparse subparsers action (``kvt bench``)."""
    p = sub.add_parser("bench", help="benchmarks: per-stage latency, end-to-end, FLOPs, Triton",
                       description="Latency, FLOPs/MFU, memory and Triton client benchmarks. Results are "
                                   "written as JSON, Markdown and PNG to --out.")
    _add_subcommands(p)


def _add_subcommands(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_command", required=True)

    s = sub.add_parser("stage", help="per-stage latency at a request's shapes, with FLOPs and MFU")
    _common(s, "baseline,fast")
    s.add_argument("--fps-modes", default="low,medium,high", help="the request shapes to cover")
    s.add_argument("--stages", help="comma-separated subset of stages")
    s.add_argument("--warmup", type=int, default=2, help="untimed calls per stage and shape")
    s.add_argument("--iterations", type=int, default=5, help="timed calls per stage and shape")
    s.set_defaults(func=_run_stage)

    e = sub.add_parser("e2e", help="end-to-end generation per fps mode, split by stage; overhead, memory")
    _common(e, "baseline,fast")
    e.add_argument("--fps-modes", default="low,medium,high", help="fps modes to generate (one request each)")
    e.add_argument("--steps", default=_DEFAULT_STEPS,
                   help="key-frame, base-frame, interpolation steps (official: 50,50,10)")
    e.add_argument("--warmup-steps", type=int, default=2,
                   help="steps of the warm-up request per fps mode (-1: no warm-up)")
    e.set_defaults(func=_run_e2e)

    f = sub.add_parser("flops", help="FLOPs per stage call and per request (meta device, no weights)")
    f.add_argument("--preset", default="full", help="tiny, small or full")
    f.add_argument("--width", type=int, default=512, help="frame width")
    f.add_argument("--height", type=int, default=512, help="frame height")
    f.add_argument("--out", default=str(DEFAULT_OUT), help="results folder (default: ./bench-results)")
    f.add_argument("--name", help="base name of the result files (default: derived from the settings)")
    f.set_defaults(func=_run_flops)

    h = sub.add_parser("headline", help="one time-boxed GPU session: environment, ceilings, attention census, "
                                        "e2e fast vs baseline, per-switch A/B, MoVQ precision",
                       description=headline.__doc__)
    headline.add_arguments(h)
    h.set_defaults(func=headline.run_headline)

    t = sub.add_parser("triton", help="Triton client latency / throughput at several concurrency levels")
    t.add_argument("--url", required=True, help="HOST:PORT of the server")
    t.add_argument("--protocol", default="http", choices=("http", "grpc"), help="the port's protocol")
    t.add_argument("--model", default="kandinsky_video", help="the orchestrator model's name")
    t.add_argument("--concurrency", default="1,2,4", help="comma-separated numbers of concurrent clients")
    t.add_argument("--requests", type=int, default=2, help="timed requests per worker")
    t.add_argument("--warmup", type=int, default=1, help="untimed requests per worker")
    t.add_argument("--prompt", default="a red fox running through snow, cinematic", help="text of every request")
    t.add_argument("--seed", type=int, default=0, help="seed of every request")
    t.add_argument("--width", type=int, default=512, help="frame width (within the served range)")
    t.add_argument("--height", type=int, default=512, help="frame height (within the served range)")
    t.add_argument("--fps", default="low", help="low, medium or high")
    t.add_argument("--steps", default=_DEFAULT_STEPS, help="key-frame, base-frame, interpolation steps")
    t.add_argument("--inprocess-json", help="an e2e result JSON to compare with (same backend and request)")
    t.add_argument("--out", default=str(DEFAULT_OUT), help="results folder (default: ./bench-results)")
    t.add_argument("--name", help="base name of the result files (default: derived from the settings)")
    t.set_defaults(func=_run_triton)


def _steps(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise UsageError(f"--steps {text!r}: give three positive integers KEY,BASE,INTERP (e.g. {_DEFAULT_STEPS})")
    return values[0], values[1], values[2]


def _fps_modes(text: str) -> list[str]:
    modes = parse_list(text) or []
    bad = [m for m in modes if m not in FPS_FRAMES]
    if bad or not modes:
        raise UsageError(f"--fps-modes {text!r}: allowed values {', '.join(FPS_FRAMES)}")
    return modes


def _setup(args: argparse.Namespace) -> tuple[PipelineSource, list[str], FastPathOptions, int, int]:
    threads(args)
    chosen = preset(args.preset)
    width = args.width or chosen.default_width
    height = args.height or chosen.default_height
    options = FastPathOptions(
        compile=args.compile, cuda_graphs=False if args.no_cuda_graphs else None,
        channels_last=False if args.no_channels_last else None,
        text_encoder_dtype=torch.float32 if args.fp32_text_encoder else None)
    source = (PipelineSource.checkpoint(args.weights, args.text_encoder, device=args.device) if args.weights
              else PipelineSource.preset(chosen.name, seed=args.seed, device=args.device,
                                         init_on_device=torch.device(args.device).type == "cuda"))
    return source, parse_pipelines(args.pipelines), options, width, height


def _run_stage(args: argparse.Namespace) -> int:
    source, pipelines, options, width, height = _setup(args)
    stages = parse_list(args.stages)
    return commands.stage_command(source, pipelines, options, width, height, _fps_modes(args.fps_modes),
                                  stages, args.warmup, args.iterations, Path(args.out), args.name,
                                  args.onnx_dir)


def _run_e2e(args: argparse.Namespace) -> int:
    source, pipelines, options, width, height = _setup(args)
    warmup = None if args.warmup_steps < 0 else args.warmup_steps
    return commands.e2e_command(source, pipelines, options, width, height, _fps_modes(args.fps_modes),
                                _steps(args.steps), warmup, Path(args.out), args.name, args.onnx_dir)


def _run_flops(args: argparse.Namespace) -> int:
    return commands.flops_command(args.preset, args.width, args.height, Path(args.out), args.name)


def _run_triton(args: argparse.Namespace) -> int:
    try:
        levels = [int(v) for v in parse_list(args.concurrency) or []]
    except ValueError:
        raise UsageError(f"--concurrency {args.concurrency!r}: comma-separated positive integers") from None
    return commands.triton_command(args.url, args.protocol, args.model, levels, args.requests, args.warmup,
                                   args.prompt, args.seed, args.width, args.height, args.fps,
                                   _steps(args.steps), args.inprocess_json, Path(args.out), args.name)
