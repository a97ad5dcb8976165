"""``kvt make-weights`` and ``kvt convert-weights``: checkpoint directories in the official layout."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvt.cli.common import DTYPES, UsageError, add_threads_option, dtype, preset, say, threads
from kvt.contract.errors import EXIT_OK
from kvt.models.checkpoint_write import write_checkpoint_dir
from kvt.models.convert import convert_checkpoint_dir
from kvt.models.random_weights import random_models


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-weights", help="write a checkpoint directory with seeded random weights",
                       description="Writes configs.json, t2v.pt, interpolation.pt, movq.pt, video_movq.pt, "
                                   "t5_projections.pt and a T5 folder in the official layout.")
    p.add_argument("--preset", default="tiny", help="tiny or full (full needs ~40 GB of RAM in float32)")
    p.add_argument("--out", required=True, help="directory to create")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--dtype", choices=DTYPES, help="cast stored weights (e.g. float16 for full size)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    add_threads_option(p, "torch (random initialisation)")
    p.set_defaults(func=run_make_weights)

    p = sub.add_parser("convert-weights", help="rewrite official .pt checkpoints as safetensors (same keys)",
                       description="Reads each .pt once with weights_only=True (a pickle that would run "
                                   "code is refused) and writes <stem>.safetensors, configs.json and the "
                                   "Flan-UL2 folder (pickled shards rewritten as safetensors) to --out, "
                                   "with sizes and SHA-256 of every file in kvt-weights.json.")
    p.add_argument("weights", help="checkpoint directory in the official layout")
    p.add_argument("--out", required=True, help="directory to create")
    p.add_argument("--text-encoder", help="Flan-UL2 folder (default: configs.json text_encoder.weights_path)")
    p.add_argument("--keep-text-encoder-in-place", action="store_true",
                   help="do not copy the Flan-UL2 folder; the new configs.json points at it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.set_defaults(func=run_convert_weights)


def run_make_weights(args: argparse.Namespace) -> int:
    chosen = preset(args.preset)
    if Path(args.out).exists() and not args.overwrite:
        raise UsageError(f"--out {args.out} already exists (pass --overwrite to replace it)")
    threads(args)
    models = random_models(chosen, seed=args.seed)
    path = write_checkpoint_dir(models, args.out, overwrite=args.overwrite, dtype=dtype(args.dtype))
    say("", f"wrote preset {chosen.name!r} (seed {args.seed}) to {path}")
    print(path)
    return EXIT_OK


def run_convert_weights(args: argparse.Namespace) -> int:
    if Path(args.out).exists() and not args.overwrite:
        raise UsageError(f"--out {args.out} already exists (pass --overwrite to replace it)")
    path = convert_checkpoint_dir(args.weights, args.out, args.text_encoder, overwrite=args.overwrite,
                                  include_text_encoder=not args.keep_text_encoder_in_place,
                                  report=lambda message: say("", message))
    say("", f"wrote {path} (safetensors; load it with --weights {path})")
    print(path)
    return EXIT_OK
