"""``kvt build`` and ``kvt doctor``: the command-line faces of kvt.engines."""

from __future__ import annotations

import argparse
import json
import re
import sys

EXIT_OK, EXIT_FAILURE, EXIT_INVALID = 0, 1, 2

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """``"4GiB"`` / ``"512M"`` / ``"1048576"`` -> bytes (binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"size {text!r}: expected a number with an optional unit (B, KiB, MiB, GiB, TiB)")
    unit = (match.group(2) or "").lower()[:1]
    return int(float(match.group(1)) * _UNITS[unit])


def add_build_parser(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--verbose", action="store_true", help="TensorRT's info messages")
    p.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..export.manifest import ExportManifestError
    from .builder import BuildOptions, EngineBuildError, OnnxParseError, build_engines
    from .manifest import EngineManifestError
    from .profiles import ProfileError, parse_fps_modes, parse_resolution
    from .trt_env import TensorRTUnavailable

    def say(message: str) -> None:
        print(f"kvt build: {message}", file=sys.stderr, flush=True)

    try:
        resolutions = [parse_resolution(r) for r in args.resolution]
        fps_modes = parse_fps_modes(args.fps)
        workspace = parse_size(args.workspace) if args.workspace else None
        options = BuildOptions(optimization_level=args.opt_level, workspace_bytes=workspace,
                               timing_cache=Path(args.timing_cache) if args.timing_cache else None,
                               force=args.force, overwrite=args.overwrite, verbose=args.verbose)
        stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    except (ProfileError, ValueError) as exc:
        say(f"error: {exc}")
        return EXIT_INVALID
    try:
        result = build_engines(args.onnx, args.out, resolutions, fps_modes, stages, options, report=say,
                               table_batch=args.batch_range == "table")
    except (ProfileError, ExportManifestError, EngineManifestError, KeyError) as exc:
        say(f"error: {exc}")
        return EXIT_INVALID
    except TensorRTUnavailable as exc:
        say(f"cannot build here: {exc}")
        return EXIT_FAILURE
    except (OnnxParseError, EngineBuildError) as exc:
        say(f"failed: {exc}")
        return EXIT_FAILURE
    reused = sum(s.reused for s in result.stages)
    say(f"{len(result.stages)} plans for TensorRT {result.tensorrt_version} on {result.gpu} "
        f"({reused} reused, {len(result.stages) - reused} built)")
    print(args.out)
    return EXIT_OK


def add_doctor_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="print what is installed and which backends will run",
                       description="GPU and driver, TensorRT, ONNX Runtime providers, tritonserver / "
                                   "tritonclient, and the backends usable on this machine.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_doctor)


def run_doctor(args: argparse.Namespace) -> int:
    from .doctor import diagnose

    report = diagnose()
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.render())
    return EXIT_OK
