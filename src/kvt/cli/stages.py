"""``kvt stages``: print the stage contract table."""

from __future__ import annotations

import argparse
import json

from kvt.cli.common import preset
from kvt.contract.errors import EXIT_OK
from kvt.models.stage_modules import stage_table_for


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stages", help="print the stage contract table")
    p.add_argument("--preset", default="full", help="the preset whose dims the table shows (default: full)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    table = stage_table_for(preset(args.preset).config)
    if args.json:
        print(json.dumps([stage.to_dict() for stage in table], indent=1))
        return EXIT_OK
    for stage in table:
        print(f"{stage.name}  ({stage.network})  {stage.doc}")
        for kind, tensors in (("in ", stage.inputs), ("out", stage.outputs)):
            for t in tensors:
                print(f"   {kind} {t.name:<18} {t.dtype.value:<8} [{', '.join(map(str, t.shape))}]")
        for i, profile in enumerate(stage.profiles):
            dims = ", ".join(f"{k} {d.min}/{d.opt}/{d.max}" + (f" step {d.multiple_of}" if d.multiple_of > 1 else "")
                             for k, d in profile.items())
            print(f"   profile {i}: {dims}")
    return EXIT_OK
