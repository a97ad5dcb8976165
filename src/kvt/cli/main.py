"""The ``kvt`` command line: the one place that knows every command, and the one map from error kind to
exit code.

    kvt generate "PROMPT" --out video.mp4     generate (embedded tiny preset unless --weights DIR)
    kvt make-weights / convert-weights        checkpoint directories in the official layout
    kvt stages [--preset full] [--json]       the stage contract table
    kvt export / build / triton-repo          ONNX export, TensorRT plans, Triton repository
    kvt plan-memory                           GPU memory of a set of plans (computed, not measured)
    kvt doctor                                what is installed and which backends will run
    kvt bench stage|e2e|flops|headline|triton benchmarks

Exit codes (:data:`kvt.contract.errors.EXIT_CODES`): 0 done, 2 invalid input (nothing is written),
1 a dependency missing here or a failure at run time, 124 timed out, 130 cancelled. Any other exception
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from types import ModuleType

from kvt import __version__
from kvt.cli import bench, build, doctor, export, generate, plan_memory, rehearse, serve, stages, triton, weights
from kvt.cli.common import say
from kvt.contract.errors import (  # noqa: F401  (EXIT_* re-exported for callers of main())
    EXIT_CANCELLED,
    EXIT_FAILURE,
    EXIT_INVALID,
    EXIT_OK,
    CancelledError,
    TimedOutError,
    UnavailableError,
    UserError,
    exit_code,
)

EXIT_BROKEN_PIPE = 128 + 13  # as `seq 1 1000000 | head` exits: killed by SIGPIPE

# Each module registers its subcommands (register(sub)) and sets ``func`` on them; order = help order.
COMMANDS: tuple[ModuleType, ...] = (generate, weights, stages, export, build, plan_memory, triton, serve, rehearse,
                                     doctor, bench)


_VERBOSE_HELP = ("info-level logging and the messages of third-party tools (torch.onnx, ONNX Runtime, "
                 "TensorRT, transformers); accepted before or after the command")


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in dict.fromkeys(action.choices.values()):
                yield choice
                yield from _subparsers(choice)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvt", description="Kandinsky Video 1.1 deployment toolkit")
    parser.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    parser.add_argument("--version", action="version", version=f"kvt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    for command in _subparsers(parser):
        # SUPPRESS: a subcommand without -v leaves the value of `kvt -v CMD` alone.
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help=_VERBOSE_HELP)
    return parser


def _label(error: BaseException, command: str) -> str:
    if isinstance(error, UserError):
        return f"error: {error}"
    if isinstance(error, UnavailableError):
        return f"cannot {command} here: {error}"
    if isinstance(error, TimedOutError):
        return f"timed out: {error}"
    if isinstance(error, (CancelledError, KeyboardInterrupt)):
        return "cancelled; nothing was written"
    return f"failed: {error}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:  # everything after `--` goes to the tool a command runs (kvt serve: tritonserver)
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if passthrough and not getattr(args, "accepts_passthrough", False):
        parser.error(f"kvt {args.command} takes no arguments after `--`")
    args.passthrough = passthrough
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        code: int = args.func(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # `kvt stages | head`: the reader left. Point stdout at /dev/null so the interpreter's final
        # flush does not fail again, and exit as a process killed by SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (Exception, KeyboardInterrupt) as error:
        code_for = exit_code(error)
        if code_for is None:
            raise  # not one of ours: a bug, with its traceback
        say(args.command, _label(error, args.command))
        return code_for


if __name__ == "__main__":
    sys.exit(main())
