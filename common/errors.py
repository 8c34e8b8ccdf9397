"""User errors, and how a command line reports them: one line, exit status 2, no traceback.

A *user error* is something the person running the script must fix — a flag value, a missing
or unreadable file, a corrupt slide, a checkpoint that does not fit. It is either

- an instance of :class:`UserError`, the base of the project's own error types (``ConfigError``,
  ``CheckpointError``, ``SlideError``, ``PretrainedError``, :class:`DataError` and the tasks' own
  data errors), whose message starts with the file or flag it is about; or
- an :class:`OSError` (a missing file, a folder that is not one, no permission, no space left,
  an image the decoder cannot identify): the file system's answer about a path the user gave.

Everything else — a plain ``ValueError``, ``KeyError``, ``RuntimeError`` — is treated as a bug and
keeps its traceback: catching every ``ValueError`` would hide bugs behind one-line messages, so
the project's checks raise their own types instead (``parse_config`` turns a ``ValueError``
from a config's ``validate()`` into a ``ConfigError``, since validating is all that method does).

Every script's ``__main__`` block runs inside :func:`exit_on_user_error`; ``common.dist.launch``
carries a user error out of the worker processes it spawns. ``PATHMONO_TRACEBACK=1`` in the
environment lets the traceback through, for bug reports.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

TRACEBACK_ENV = "PATHMONO_TRACEBACK"


class UserError(Exception):
    """An input the user must fix; its message names the file or flag, then what is wrong."""


class DataError(UserError, ValueError):
    """An input file that exists but whose content cannot be used (a malformed list, a missing
    column, labels that do not match); the message starts with the file."""


#: what :func:`exit_on_user_error` reports as one line
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, OSError)


def traceback_requested() -> bool:
    """True when ``PATHMONO_TRACEBACK`` asks for full tracebacks (any value but empty/0/false)."""
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in {"", "0", "false", "no", "off"}


def describe(err: BaseException) -> str:
    """``<file>: <what is wrong>`` on one line (an ``OSError`` with a file name is rephrased so)."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err) or type(err).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """For ``__main__`` blocks: a user error ends the program with ``error: <message>`` on one
    stderr line and exit status 2 (argparse's status for a bad command line), without a
    traceback unless :func:`traceback_requested`."""
    try:
        yield
    except USER_ERRORS as err:
        if traceback_requested():
            raise
        print(f"error: {describe(err)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
