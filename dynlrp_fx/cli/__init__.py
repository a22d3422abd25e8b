"""Command line: ``dynlrp <command>`` or ``python -m dynlrp_fx <command>``.

One module per subcommand (:data:`COMMANDS`: ``info``, ``coverage``, ``export``, ``demo``, ``explain``,
``evaluate``, ``cache``), each with ``register_cli(subparsers)``, which adds its parser and sets ``func`` (``args -> exit
code``), and ``run(args)``. :mod:`._models` loads models and inputs from ``--model MODULE:CALLABLE`` /
``--input-shape`` / ``--input``. All argparse code of the package lives here; the library modules have none.

Errors (:mod:`._errors`): :func:`main` is the one error boundary. Expected failures (``DynlrpError``, bad argument
values, files) print one line ``dynlrp <command>: error: <message>`` on stderr and exit 1 (2 for usage errors, as
argparse does); argparse's own usage errors are one line too. ``--debug`` (before or after the command) prints the
traceback as well. Any other exception is reported in one line as a bug in dynlrp-fx.
"""

from __future__ import annotations

import argparse
import sys

from . import cache, coverage, demo, evaluate, explain, export, info
from ._errors import EXPECTED, fail, internal_error

__all__ = ["main", "build_parser", "COMMANDS"]

#: subcommand modules, in the order ``dynlrp --help`` lists them
COMMANDS = (info, coverage, export, demo, explain, evaluate, cache)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line: ``PROG: error: MESSAGE; see 'PROG --help'`` (exit 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}; see '{self.prog} --help'\n")


_DEBUG_HELP = "on errors, print the full traceback too"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from .. import __version__

    parser = _Parser(
        prog="dynlrp",
        description="dynlrp-fx: Layer-wise Relevance Propagation for any PyTorch model (torch.fx graph compiler).",
    )
    parser.add_argument("--version", action="version", version=f"dynlrp-fx {__version__}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMANDS:
        mod.register_cli(sub)
    for p in sub.choices.values():  # `dynlrp explain ... --debug` works too
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dynlrp`` command; returns the exit code.

    The error boundary of every subcommand: an expected error (:data:`._errors.EXPECTED`) is one line on stderr and
    exit code 1 (2 for usage errors), anything else one line saying it is a bug; ``--debug`` adds the traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"dynlrp {args.command}: interrupted", file=sys.stderr)
        return 130
    except EXPECTED as e:
        return fail(args, args.command, e)
    except Exception as e:  # noqa: BLE001 - the boundary: one line, not a traceback
        return internal_error(args, args.command, e)
