"""``kvt export``: every stage to ONNX (FP32 or FP16) with a parity report."""

from __future__ import annotations

import argparse

from kvt.cli.common import UsageError, add_threads_option, parse_list, preset, say, threads
from kvt.contract.errors import EXIT_OK
from kvt.contract.stages import ResolutionRange
from kvt.export.exporter import ExportOptions, export_onnx
from kvt.export.graph_cache import CACHE_ENV, default_cache_dir
from kvt.export.source import ExportSource


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export every stage to ONNX (FP32 or FP16) with a parity report",
        description="Writes one ONNX model per stage of the stage table (opset 18, dynamic axes from the "
                    "table, external data for models over 1 GiB), the tokenizer, the null embeddings, "
                    "parity.json / parity.md and manifest.json. Weights come from --weights (official "
                    "layout) or, without it, seeded random weights of the preset.")
    p.add_argument("--preset", help="architecture of the random weights: tiny (default), small or full; "
                                    "with --weights a check that the checkpoint is this preset (without "
                                    "it the checkpoint's configs.json decides)")
    p.add_argument("--weights", help="checkpoint directory in the official layout")
    p.add_argument("--text-encoder", help="Flan-UL2 folder (default: configs.json text_encoder.weights_path)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (without --weights)")
    p.add_argument("--out", required=True, help="export directory to create")
    p.add_argument("--precision", default="fp32", help="fp32 or fp16 (U-Nets in FP16, T5 and MoVQs FP32)")
    p.add_argument("--fp16-movq", action="store_true",
                   help="also run the MoVQs in FP16 (changes outputs; off by default)")
    p.add_argument("--stages", help="comma-separated subset of the stage table (default: all)")
    p.add_argument("--jobs", type=int,
                   help="stages traced in parallel (worker processes, one thread each; default: one per core "
                        "this process may use, at most one per stage to trace)")
    p.add_argument("--parity-shapes", default="min,opt,max,odd",
                   help="shapes of the parity check: any of min,opt,max,odd, or 'none'")
    p.add_argument("--resolution", metavar="MIN,OPT,MAX",
                   help="frame sizes in pixels (multiples of 64) the dynamic ranges and parity shapes cover "
                        "(default: the preset's range, else 64,512,1024)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    p.add_argument("--reuse-stages", action="store_true",
                   help="take the stages that an export in the same parent directory holds identically (same "
                        "weights, opset, compute precision and graph: the T5 and MoVQs of an FP32 export "
                        "for an FP16 one) with their parity results, instead of exporting them again")
    p.add_argument("--no-graph-cache", action="store_true",
                   help=f"trace every stage; default: reuse traced graphs from {default_cache_dir()} "
                        f"(${CACHE_ENV} moves it), keyed by architecture, precision, tool versions and kvt's code")
    add_threads_option(p, "the parity check (torch reference and ONNX Runtime) in the main process")
    p.set_defaults(func=run)


def _resolution(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",")]
        if len(values) != 3:
            raise ValueError(f"{len(values)} values given")
        ResolutionRange(*values)
    except ValueError as exc:
        raise UsageError(f"--resolution {text!r}: three multiples of 64, MIN,OPT,MAX with MIN <= OPT <= MAX "
                         f"({exc})") from None
    return (values[0], values[1], values[2])


def run(args: argparse.Namespace) -> int:
    def report(message: str) -> None:
        say("export", message)

    if args.preset is not None:
        preset(args.preset)
    threads(args)
    shapes = () if args.parity_shapes.strip().lower() == "none" else tuple(parse_list(args.parity_shapes) or ())
    stages = parse_list(args.stages)
    options = ExportOptions(
        precision=args.precision, fp16_movq=args.fp16_movq, stages=tuple(stages) if stages else None,
        jobs=args.jobs, parity_shapes=shapes, overwrite=args.overwrite, reuse_stages=args.reuse_stages,
        graph_cache=None if args.no_graph_cache else str(default_cache_dir()), verbose=args.verbose,
        resolution=_resolution(args.resolution))
    source = ExportSource(args.preset, args.weights, args.text_encoder, args.seed)
    export_onnx(source, args.out, options, report=report)
    print(args.out)
    return EXIT_OK
