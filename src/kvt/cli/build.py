"""``kvt build``: TensorRT plans (one per stage) from an ONNX export."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvt.cli.common import parse_list, parse_size, say
from kvt.contract.errors import EXIT_OK
from kvt.contract.profiles import parse_fps_modes, parse_resolution
from kvt.engines.builder import BuildOptions, build_engines


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build", help="build TensorRT plans (one per stage) from an ONNX export",
        description="Builds strongly typed TensorRT plans from the graphs of `kvt export` (the fp16 export "
                    "for FP16 U-Nets), with optimisation profiles from the stage table: the table's whole "
                    "range, or tight ranges for the --resolution and --fps modes given. Plans are cached "
                    "under their build key (ONNX hash, profiles, precision, TensorRT version, GPU); a valid "
                    "plan is reused. Needs TensorRT and an NVIDIA GPU.")
    p.add_argument("--onnx", required=True, metavar="DIR", help="export directory of `kvt export`")
    p.add_argument("--out", required=True, metavar="DIR", help="engine directory (created or updated)")
    p.add_argument("--resolution", action="append", default=[], metavar="WxH",
                   help="frame size to serve, e.g. 512x512 (repeatable; the first is tuned for). "
                        "Default: the export's whole resolution range")
    p.add_argument("--fps", action="append", default=[], metavar="MODE",
                   help="fps mode to serve: low, medium or high (repeatable; default: all)")
    p.add_argument("--stages", help="comma-separated subset of the exported stages (default: all)")
    p.add_argument("--batch-range", choices=("requests", "table"), default="requests",
                   help="with --resolution: batch dims exactly as one request calls them (requests) or "
                        "the stage table's range for batching several (table)")
    p.add_argument("--opt-level", type=int, default=3, help="builder optimisation level 0..5 (default 3)")
    p.add_argument("--workspace", help="workspace memory-pool limit, e.g. 8GiB (default: TensorRT's)")
    p.add_argument("--timing-cache", help="timing cache file (default: OUT/timing.cache)")
    p.add_argument("--force", action="store_true", help="rebuild even when a valid plan exists")
    p.add_argument("--overwrite", action="store_true", help="replace plans of another export in OUT")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    def report(message: str) -> None:
        say("build", message)

    resolutions = [parse_resolution(r) for r in args.resolution]
    fps_modes = parse_fps_modes(args.fps)
    workspace = parse_size(args.workspace) if args.workspace else None
    options = BuildOptions(optimization_level=args.opt_level, workspace_bytes=workspace,
                           timing_cache=Path(args.timing_cache) if args.timing_cache else None,
                           force=args.force, overwrite=args.overwrite, verbose=args.verbose)  # -v: TensorRT's info messages too
    result = build_engines(args.onnx, args.out, resolutions, fps_modes, parse_list(args.stages), options,
                           report=report, table_batch=args.batch_range == "table")
    reused = sum(s.reused for s in result.stages)
    report(f"{len(result.stages)} plans for TensorRT {result.tensorrt_version} on {result.gpu} "
           f"({reused} reused, {len(result.stages) - reused} built)")
    print(args.out)
    return EXIT_OK
