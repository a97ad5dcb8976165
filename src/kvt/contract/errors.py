"""One root for every error kvt raises on purpose, and the kinds a caller acts on.

A caller (the CLI, the Triton orchestrator, a user's program) needs to know one thing about an error:
whose move it is. The kinds say that:

* :class:`UserError` - a value, flag, file or request the user gave is wrong; fixing the input fixes it.
  Also a ``ValueError``, so ``except ValueError`` in existing callers keeps working.
* :class:`UnavailableError` - something this machine lacks (TensorRT, a GPU, an execution provider,
  a server); installing or running it elsewhere fixes it.
* :class:`CancelledError` - the caller asked to stop; nothing was written.
* :class:`TimedOutError` - a time limit ran out; nothing was written.
* :class:`KvtError` itself - a failure at run time (an engine that will not run, a server that
  answers with an error) that is neither of the above.

Anything else that escapes is a bug and keeps its traceback. The CLI maps the kinds to exit codes in one
place (:data:`EXIT_CODES`).
"""

from __future__ import annotations


class KvtError(Exception):
    """Root of every error kvt raises on purpose."""


class UserError(KvtError, ValueError):
    """Bad input: a value, flag, file or request the user gave."""


class UnavailableError(KvtError, RuntimeError):
    """A dependency, device or service this machine lacks."""


class CancelledError(KvtError):
    """The caller asked to stop."""


class TimedOutError(KvtError):
    """A time limit ran out."""


EXIT_OK, EXIT_FAILURE, EXIT_INVALID, EXIT_TIMEOUT, EXIT_CANCELLED = 0, 1, 2, 124, 130

# Exit code of each kind, most specific first (the CLI picks the first class the error is an instance of).
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (UserError, EXIT_INVALID),
    (UnavailableError, EXIT_FAILURE),
    (TimedOutError, EXIT_TIMEOUT),
    (CancelledError, EXIT_CANCELLED),
    (KeyboardInterrupt, EXIT_CANCELLED),
    (KvtError, EXIT_FAILURE),
)


def exit_code(error: BaseException) -> int | None:
    """The exit code for ``error``, or None when it is not one of ours (a bug: let it propagate)."""
    for kind, code in EXIT_CODES:
        if isinstance(error, kind):
            return code
    return None
