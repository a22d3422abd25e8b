"""Command line: ``dynlrp <command>`` or ``python -m dynlrp_fx <command>``.

One module per subcommand (:data:`COMMANDS`: ``info``, ``coverage``, ``export``, ``demo``, ``explain``), each with
``register_cli(subparsers)``, which adds its parser and sets ``func`` (``args -> exit code``), and ``run(args)``.
:mod:`._models` loads models and inputs from ``--model MODULE:CALLABLE`` / ``--input-shape`` / ``--input``. All
argparse code of the package lives here; the library modules have none.
"""

from __future__ import annotations

import argparse

from . import coverage, demo, explain, export, info

__all__ = ["main", "build_parser", "COMMANDS"]

#: subcommand modules, in the order ``dynlrp --help`` lists them
COMMANDS = (info, coverage, export, demo, explain)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="dynlrp",
        description="dynlrp-fx: Layer-wise Relevance Propagation for any PyTorch model (torch.fx graph compiler).",
    )
    parser.add_argument("--version", action="version", version=f"dynlrp-fx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMANDS:
        mod.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dynlrp`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)
