"""``kvt rehearse``: check a TensorRT + Triton deployment on a machine without a GPU."""

from __future__ import annotations

import argparse
import sys

from kvt.cli.common import UsageError, add_profile_options, parse_list, say
from kvt.contract.errors import EXIT_FAILURE, EXIT_OK
from kvt.contract.profiles import parse_fps_modes, parse_resolution
from kvt.rehearsal.run import LIMITS, rehearse, write_report
from kvt.runtime.images import load_image


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rehearse", help="rehearse the TensorRT + Triton deployment on this machine (no GPU needed)",
        description="Builds stand-in plans with exactly the profiles `kvt build` would record for the same "
                    "flags, generates the repository `kvt triton-repo --backend tensorrt` would, swaps only "
                    "each tensorrt_plan stage's backend for a python stand-in that behaves as Triton's "
                    "TensorRT backend (profiles, contexts, warm-up, batching, shape errors), serves it on the "
                    "tritonserver bundled in nvidia-pytriton, and sends one text-to-video request per fps "
                    "mode built, one image-to-video request, and one request each at a size and an fps "
                    f"mode not built (which must be refused before any stage runs). It cannot show {LIMITS}.")
    p.add_argument("--onnx", required=True, metavar="EXPORT", help="export directory of `kvt export` (fp16 for engines)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the stand-in engines and the repository")
    add_profile_options(p)  # exactly `kvt build`'s
    p.add_argument("--image", metavar="PATH", help="the image-to-video request's image (default: a test image)")
    p.add_argument("--steps", default="2,2,1", metavar="K,B,I",
                   help="sampler steps of each request (key frame, base frames, interpolation; default 2,2,1: "
                        "the rehearsal checks the plumbing, not the pictures)")
    p.add_argument("--json", metavar="FILE", help="write every request's kind, fps, size, status, error, seconds")
    p.set_defaults(func=run)


def _steps(text: str) -> tuple[int, int, int]:
    try:
        values = [int(v) for v in parse_list(text) or []]
    except ValueError:
        values = []
    if len(values) != 3 or min(values) < 1:
        raise UsageError(f"--steps {text!r}: three positive integers K,B,I")
    return values[0], values[1], values[2]


def run(args: argparse.Namespace) -> int:
    resolutions = [parse_resolution(r) for r in args.resolution]
    fps_modes = parse_fps_modes(args.fps)
    image = load_image(args.image) if args.image else None
    result = rehearse(args.onnx, args.out, resolutions, fps_modes, args.batch_range, image, _steps(args.steps),
                      report=lambda message: say("rehearse", message))
    print(result.table())
    if args.json:
        write_report(result, args.json)
    failed = [r for r in result.requests if not r.ok]
    say("rehearse", "every expectation held" if not failed else f"{len(failed)} request(s) did not behave as a "
        "deployment must (see the table)")
    sys.stdout.flush()
    return EXIT_OK if not failed else EXIT_FAILURE
