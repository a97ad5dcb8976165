"""``kvt doctor``: what is installed here and which backends will run."""

from __future__ import annotations

import argparse
import json

from kvt.contract.errors import EXIT_OK
from kvt.engines.doctor import diagnose


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="print what is installed and which backends will run",
                       description="GPU and driver, TensorRT, ONNX Runtime providers, tritonserver / "
                                   "tritonclient, and the backends usable on this machine.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = diagnose()
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.render())
    return EXIT_OK
