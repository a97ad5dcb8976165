"""``kvt plan-memory``: will the TensorRT plans of a build fit one GPU (TensorRT backend and Triton)?"""

from __future__ import annotations

import argparse
import dataclasses
import json
from itertools import product

from kvt.cli.common import parse_size, say
from kvt.contract.errors import EXIT_OK, UserError
from kvt.contract.profiles import Resolution, parse_fps_modes, parse_resolution
from kvt.contract.stages import FPS_FRAMES
from kvt.engines import memory_plan
from kvt.engines.builder import TEXT_ENCODER_PRECISIONS
from kvt.models.presets import PRESETS

BACKENDS = ("tensorrt", "triton")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan-memory", help="GPU memory of a set of TensorRT plans (computed, not measured)",
        description="Computes, on the meta device, what the plans `kvt build` would make need on one GPU: "
                    "weights per plan at its precision, a bound of activation memory per "
                    "optimisation profile (live tensors of one eager call, the builder workspace, and the "
                    "unfused attention worst case where the attention lint cannot rule it out), I/O, and "
                    "the totals of the TensorRT backend (one shared activation buffer) and of Triton "
                    "(activation memory per model and execution context). Exits 0 when the set fits with "
                    "--min-spare of the GPU free, 2 with the breakdown when it does not.")
    p.add_argument("--preset", default="full", choices=sorted(PRESETS), help="model sizes (default: full)")
    p.add_argument("--resolution", action="append", default=[], metavar="WxH",
                   help="frame size to serve (repeatable; default: the preset's whole range, as `kvt build`)")
    p.add_argument("--fps", action="append", default=[], metavar="MODE",
                   help="fps mode to serve: low, medium or high (repeatable; default: all)")
    p.add_argument("--gpu", action="append", default=[], metavar="NAME|SIZE",
                   help=f"target GPU: {', '.join(memory_plan.KNOWN_GPUS)} or a memory size such as 80GiB "
                        "(repeatable; default: H100-80GB)")
    p.add_argument("--backend", choices=(*BACKENDS, "both"), default="both",
                   help="which totals must fit (default: both)")
    p.add_argument("--text-encoder-precision", choices=TEXT_ENCODER_PRECISIONS, default="bf16",
                   help="the text encoder plan's precision (as `kvt build`; default bf16)")
    p.add_argument("--fp16-movq", action="store_true", help="MoVQ plans from an export with --fp16-movq")
    p.add_argument("--workspace", default=None, metavar="SIZE",
                   help=f"builder workspace limit, as `kvt build --workspace` (default "
                        f"{memory_plan.DEFAULT_WORKSPACE_BYTES // 2**20} MiB)")
    p.add_argument("--triton-allocation", choices=memory_plan.ALLOCATION_STRATEGIES, default="STATIC",
                   help="Triton TensorRT backend's execution_context_allocation_strategy (default STATIC)")
    p.add_argument("--min-spare", type=float, default=memory_plan.DEFAULT_MIN_SPARE,
                   help="fraction of the GPU that must stay free (default 0.10)")
    p.add_argument("--table", action="store_true",
                   help="one summary row per resolution and per fps mode (each alone, then all together) "
                        "and GPU, as docs/TENSORRT.md shows it")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _fps_sets(modes: tuple[str, ...], table: bool) -> list[tuple[str, ...]]:
    if not table:
        return [modes]
    sets: list[tuple[str, ...]] = [(mode,) for mode in modes]
    return sets + [modes] if len(modes) > 1 else sets


def run(args: argparse.Namespace) -> int:
    resolutions = [parse_resolution(r) for r in args.resolution]
    fps_modes = parse_fps_modes(args.fps) or tuple(FPS_FRAMES)
    gpus = [memory_plan.parse_gpu(g) for g in args.gpu] or [memory_plan.KNOWN_GPUS["H100-80GB"]]
    workspace = parse_size(args.workspace) if args.workspace else memory_plan.DEFAULT_WORKSPACE_BYTES
    if not 0.0 <= args.min_spare < 1.0:
        raise UserError(f"--min-spare {args.min_spare}: allowed 0 <= value < 1")
    backends = BACKENDS if args.backend == "both" else (args.backend,)
    planner = memory_plan.Planner.shared()
    size_sets: list[list[Resolution]] = ([[r] for r in resolutions] if args.table and resolutions
                                         else [resolutions])
    plans = []
    for sizes, modes in product(size_sets, _fps_sets(fps_modes, args.table)):
        say("plan-memory", f"tracing {memory_plan.describe_request(args.preset, sizes, modes)} on the meta device")
        request = memory_plan.preset_request(args.preset, sizes, modes, args.text_encoder_precision, workspace)
        if args.fp16_movq:
            precisions = memory_plan.default_precisions(request.table, args.text_encoder_precision, fp16_movq=True)
            request = dataclasses.replace(request, precisions=precisions)
        label = memory_plan.describe_request(args.preset, sizes, modes)
        for gpu in gpus:
            plans.append(planner.plan(request, gpu, label, args.triton_allocation))
    if args.json:
        print(json.dumps([memory_plan.plan_to_dict(p) for p in plans], indent=1))
    elif args.table:
        print(memory_plan.render_summary(plans))
        print(f"\nGiB; computed on the meta device by `kvt plan-memory`, not measured; spare = share of the "
              f"GPU left free; workspace {workspace / 2**20:.0f} MiB per execution context, Triton "
              f"{args.triton_allocation} allocation")
    else:
        for plan in plans:
            print(memory_plan.render_breakdown(plan))
            print()
    failing = []
    for plan in plans:
        short = [f"{b} {plan.totals(b).total / 2**30:.1f} GiB ({plan.spare(b) * 100:.0f} % spare)"
                 for b in backends if not plan.fits(b, args.min_spare)]
        if short:
            failing.append(f"{plan.label} on {plan.gpu}: {', '.join(short)}")
    if failing:
        raise memory_plan.MemoryPlanError(
            f"{len(failing)} of {len(plans)} set(s) do not fit with {args.min_spare * 100:.0f} % of the GPU "
            "to spare (breakdown above): " + "; ".join(failing))
    say("plan-memory", f"{len(plans)} set(s) fit with at least {args.min_spare * 100:.0f} % of the GPU to spare")
    return EXIT_OK
