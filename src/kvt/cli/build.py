"""``kvt build``: TensorRT plans (one per stage) from an ONNX export."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvt.cli.common import add_profile_options, parse_list, parse_size, say
from kvt.contract.errors import EXIT_OK
from kvt.contract.profiles import parse_fps_modes, parse_resolution
from kvt.engines.builder import TEXT_ENCODER_PRECISIONS, BuildOptions, build_engines
from kvt.engines.memory_plan import DEFAULT_WORKSPACE_BYTES
from kvt.runtime.backends.tensorrt.trt_env import MIN_TENSORRT_VERSION


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build", help="build TensorRT plans (one per stage) from an ONNX export",
        description="Builds strongly typed TensorRT plans from the graphs of `kvt export` (the fp16 export "
                    "for FP16 U-Nets), with optimisation profiles from the stage table: the table's whole "
                    "range, or tight ranges for the --resolution and --fps modes given. Before TensorRT is "
                    "touched the graphs pass the static checks and the memory plan (`kvt plan-memory`) must "
                    "fit the GPU. Plans are cached under their build key (ONNX hash, profiles, precision, "
                    "TensorRT version, GPU model); a valid plan is reused. Needs TensorRT >= "
                    f"{MIN_TENSORRT_VERSION} and an NVIDIA GPU.")
    p.add_argument("--onnx", required=True, metavar="DIR", help="export directory of `kvt export`")
    p.add_argument("--out", required=True, metavar="DIR", help="engine directory (created or updated)")
    add_profile_options(p)
    p.add_argument("--stages", help="comma-separated subset of the exported stages (default: all)")
    p.add_argument("--opt-level", type=int, default=3, help="builder optimisation level 0..5 (default 3)")
    p.add_argument("--workspace", help=f"workspace memory-pool limit per execution context, e.g. 2GiB "
                                       f"(default {DEFAULT_WORKSPACE_BYTES // 2**20} MiB; 'unlimited': TensorRT's, "
                                       "the whole device, which the memory plan cannot bound)")
    p.add_argument("--text-encoder-precision", choices=TEXT_ENCODER_PRECISIONS, default="bf16",
                   help="bf16 (default): the FP32 T5 graph with BF16 GEMM/embedding weights (about 17 GB "
                        "instead of 35 GB at full size, compute capability 8.0+); fp32: as exported")
    p.add_argument("--same-compute-capability", action="store_true",
                   help="plans for every GPU of this GPU's compute capability (TensorRT's "
                        "SAME_COMPUTE_CAPABILITY; may be slower); default: for this GPU model only")
    p.add_argument("--no-memory-check", action="store_true",
                   help="build even when the memory plan says the plans cannot fit this GPU")
    p.add_argument("--timing-cache", help="timing cache file (default: OUT/timing-<TensorRT>-<GPU>.cache)")
    p.add_argument("--force", action="store_true", help="rebuild even when a valid plan exists")
    p.add_argument("--overwrite", action="store_true", help="replace plans of another export in OUT")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    def report(message: str) -> None:
        say("build", message)

    resolutions = [parse_resolution(r) for r in args.resolution]
    fps_modes = parse_fps_modes(args.fps)
    if args.workspace is None:
        workspace: int | None = DEFAULT_WORKSPACE_BYTES
    else:
        workspace = None if args.workspace == "unlimited" else parse_size(args.workspace)
    options = BuildOptions(optimization_level=args.opt_level, workspace_bytes=workspace,
                           timing_cache=Path(args.timing_cache) if args.timing_cache else None,
                           force=args.force, overwrite=args.overwrite, verbose=args.verbose,
                           text_encoder_precision=args.text_encoder_precision,
                           same_compute_capability=args.same_compute_capability,
                           memory_check=not args.no_memory_check)
    result = build_engines(args.onnx, args.out, resolutions, fps_modes, parse_list(args.stages), options,
                           report=report, table_batch=args.batch_range == "table")
    reused = sum(s.reused for s in result.stages)
    report(f"{len(result.stages)} plans for TensorRT {result.tensorrt_version} on {result.gpu} "
           f"({reused} reused, {len(result.stages) - reused} built)")
    print(args.out)
    return EXIT_OK
