"""What every command shares: the usage error, messages to stderr, and parsers of option values."""

from __future__ import annotations

import argparse
import re
import sys

import torch

from kvt.contract.errors import UserError
from kvt.models.presets import Preset, get_preset
from kvt.runtime.threads import DEFAULT_THREADS, apply_threads

DTYPES = ("float32", "float16", "bfloat16")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


class UsageError(UserError):
    """A command-line value is wrong (exit code 2)."""


def say(command: str, message: str, end: str = "\n") -> None:
    """One line to stderr, prefixed with the command (``kvt build: ...``)."""
    prefix = "kvt" if command in ("", "kvt") else f"kvt {command}"
    print(f"{prefix}: {message}", file=sys.stderr, end=end, flush=True)


def add_threads_option(parser: argparse.ArgumentParser, what: str = "torch and ONNX Runtime") -> None:
    """``--threads N`` on a command that computes on the CPU (policy: kvt.runtime.threads)."""
    parser.add_argument("--threads", type=int, metavar="N",
                        help=f"CPU threads of {what} (default {DEFAULT_THREADS}: safe on a busy machine; "
                             "0: every core this process may use)")


def threads(args: argparse.Namespace) -> int:
    """Apply the command's ``--threads`` (see :func:`add_threads_option`); returns the thread count."""
    return apply_threads(getattr(args, "threads", None))


def preset(name: str) -> Preset:
    try:
        return get_preset(name)
    except ValueError as exc:
        raise UsageError(f"--preset: {exc}") from None


def dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise UsageError(f"dtype {name!r}: allowed: {', '.join(DTYPES)}")
    value: torch.dtype = getattr(torch, name)
    return value


def check_device(device: str) -> None:
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r}: allowed: cpu, cuda, cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device!r}: CUDA is not available here (torch {torch.__version__}, "
                         f"{'no GPU found' if torch.backends.cuda.is_built() else 'built without CUDA'})")


def parse_size(text: str) -> int:
    """``"4GiB"`` / ``"512M"`` / ``"1048576"`` -> bytes (binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"size {text!r}: expected a number with an optional unit (B, KiB, MiB, GiB, TiB)")
    unit = (match.group(2) or "").lower()[:1]
    return int(float(match.group(1)) * _UNITS[unit])


def parse_list(text: str | None) -> list[str] | None:
    """``"a, b,c"`` -> ["a", "b", "c"]; None or blank -> None."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    return items or None


def add_profile_options(p: argparse.ArgumentParser) -> None:
    """The options that choose the plans' optimisation profiles: `kvt build` and `kvt rehearse` (which must
    record exactly the profiles a build with the same flags records) share them."""
    p.add_argument("--resolution", action="append", default=[], metavar="WxH",
                   help="frame size to serve, e.g. 512x512 (repeatable; the first is tuned for). "
                        "Default: the export's whole resolution range")
    p.add_argument("--fps", action="append", default=[], metavar="MODE",
                   help="fps mode to serve: low, medium or high (repeatable; default: all)")
    p.add_argument("--batch-range", choices=("requests", "table"), default="requests",
                   help="with --resolution: batch dims exactly as one request calls them (requests) or "
                        "the stage table's range for batching several (table)")
