"""``kvt export``: the command-line face of kvt.export.exporter."""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_FAILURE, EXIT_INVALID = 0, 1, 2


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export every stage to ONNX (FP32 or FP16) with a parity report",
        description="Writes one ONNX model per stage of the stage table (opset 18, dynamic axes from the "
                    "table, external data for models over 1 GiB), the tokenizer, the null embeddings, "
                    "parity.json / parity.md and manifest.json. Weights come from --weights (official "
                    "layout) or, without it, seeded random weights of the preset.")
    p.add_argument("--preset", default="tiny", help="architecture: tiny or full (must match --weights)")
    p.add_argument("--weights", help="checkpoint directory in the official layout")
    p.add_argument("--text-encoder", help="Flan-UL2 folder (default: configs.json text_encoder.weights_path)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (without --weights)")
    p.add_argument("--out", required=True, help="export directory to create")
    p.add_argument("--precision", default="fp32", help="fp32 or fp16 (U-Nets in FP16, T5 and MoVQs FP32)")
    p.add_argument("--fp16-movq", action="store_true",
                   help="also run the MoVQs in FP16 (changes outputs; off by default)")
    p.add_argument("--stages", help="comma-separated subset of the stage table (default: all)")
    p.add_argument("--jobs", type=int, default=1, help="stages exported in parallel (worker processes)")
    p.add_argument("--parity-shapes", default="min,opt,max,odd",
                   help="shapes of the parity check: any of min,opt,max,odd, or 'none'")
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from ..models.checkpoints import CheckpointError
    from ..models.presets import get_preset
    from .exporter import ExportInputError, ExportOptions, ParityError, export_onnx
    from .graph_export import ExportError
    from .source import ExportSource

    def say(message: str) -> None:
        print(f"kvt export: {message}", file=sys.stderr, flush=True)

    try:
        get_preset(args.preset)
    except ValueError as exc:
        say(f"error: --preset: {exc}")
        return EXIT_INVALID
    shapes = () if args.parity_shapes.strip().lower() == "none" else tuple(
        s.strip() for s in args.parity_shapes.split(",") if s.strip())
    options = ExportOptions(
        precision=args.precision, fp16_movq=args.fp16_movq,
        stages=tuple(s.strip() for s in args.stages.split(",") if s.strip()) if args.stages else None,
        jobs=args.jobs, parity_shapes=shapes, overwrite=args.overwrite)
    source = ExportSource(args.preset, args.weights, args.text_encoder, args.seed)
    try:
        manifest = export_onnx(source, args.out, options, report=say)
    except (ExportInputError, CheckpointError) as exc:
        say(f"error: {exc}")
        return EXIT_INVALID
    except ParityError as exc:
        say(f"failed: {exc}")
        return EXIT_FAILURE
    except ExportError as exc:
        say(f"failed: {exc}")
        return EXIT_FAILURE
    for stage, summary in manifest.parity.items():
        if summary.get("skipped"):
            say(f"parity {stage}: skipped ({summary['skipped']})")
        else:
            say(f"parity {stage}: worst max rel {summary['worst_max_rel']:.2e}, worst cosine "
                f"{summary['worst_cosine']:.7f}")
    print(args.out)
    return EXIT_OK
