"""How the command line reports errors: one line on stderr, ``dynlrp <command>: error: <what>; <what to do>``.

Every subcommand's expected failures (:data:`EXPECTED`: :class:`DynlrpError` and its subclasses, ``ValueError`` /
``KeyError`` / ``TypeError`` from argument handling, ``OSError`` for files, ``ImportError`` from a model factory)
end in :func:`fail`: the message compressed to one line (:func:`one_line`), exit code 1, or 2 for usage errors
(:class:`UsageError`, as argparse does). ``--debug`` prints the traceback first. Anything else is a bug:
:func:`internal_error` says so in one line, with the exception type and message, and suggests ``--debug``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from pathlib import Path

from ..errors import DynlrpError

__all__ = ["UsageError", "EXPECTED", "one_line", "fail", "internal_error", "output_path", "make_parent"]


class UsageError(DynlrpError):
    """A bad command-line argument value (exit code 2, as for argparse's own usage errors)."""


#: exceptions that are the user's to fix (bad arguments, files, models); anything else is reported as a bug
EXPECTED: tuple[type[BaseException], ...] = (DynlrpError, ValueError, KeyError, TypeError, OSError, ImportError)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line(exc: BaseException | str, limit: int = 800) -> str:
    """The message of ``exc`` on one line: stripped lines joined by spaces (a ``KeyError``'s message without the
    quotes its ``str`` adds, an ``OSError`` as ``strerror: filename``). Longer than ``limit`` characters: the
    beginning and the last line (which says what to do in dynlrp's messages)."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]
    elif isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.strerror}: {exc.filename}"
    else:
        text = str(exc)
    lines = [" ".join(ln.split()) for ln in _ANSI.sub("", text).splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    msg = " ".join(lines)
    if len(msg) > limit:
        last = lines[-1] if len(lines) > 1 and len(lines[-1]) < limit // 2 else ""
        head = msg[: max(limit - len(last) - 5, limit // 2)].rstrip()
        msg = f"{head} ... {last}" if last else f"{head} ..."
    return msg


def _debug(args: argparse.Namespace | None) -> bool:
    return bool(getattr(args, "debug", False))


def fail(args: argparse.Namespace | None, command: str, exc: BaseException, code: int | None = None) -> int:
    """Report an expected error ``exc`` of ``dynlrp <command>`` (the traceback first with ``--debug``); returns
    the exit code: ``code``, else 2 for a :class:`UsageError` and 1 otherwise."""
    if _debug(args):
        traceback.print_exception(exc)
    print(f"dynlrp {command}: error: {one_line(exc)}", file=sys.stderr, flush=True)
    if code is not None:
        return code
    return 2 if isinstance(exc, UsageError) else 1


def internal_error(args: argparse.Namespace | None, command: str, exc: BaseException) -> int:
    """Report an unexpected exception: a bug in dynlrp-fx (exit code 1)."""
    if _debug(args):
        traceback.print_exception(exc)
        hint = "please report it with the traceback above"
    else:
        hint = "rerun with --debug for the traceback and please report it"
    print(
        f"dynlrp {command}: internal error (a bug in dynlrp-fx): {type(exc).__name__}: {one_line(exc, 400)}; {hint}",
        file=sys.stderr,
        flush=True,
    )
    return 1


def output_path(path: str | os.PathLike, flag: str) -> Path:
    """Check, before any work, that ``path`` (the value of ``flag``) can be written: not a directory, and its
    nearest existing parent is a writable directory. Missing parent directories are fine: :func:`make_parent`
    creates them when the file is written. Raises :class:`UsageError` naming the flag and the path."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {p}: is a directory; give a file name, e.g. {p / 'out'}")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {p}: {parent} is not a directory; choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {p}: no permission to write in {parent}; choose another output path")
    return p


def make_parent(path: str | os.PathLike) -> Path:
    """Create the missing parent directories of ``path`` (an output file); returns ``path`` as a Path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p
