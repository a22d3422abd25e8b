"""Command line: ``dynlrp <command>`` or ``python -m dynlrp_fx <command>``.

Each feature module contributes its subcommands through a ``register_cli(subparsers)`` function that adds a
parser and sets ``func`` (``args -> exit code``). The modules are listed in :data:`COMMAND_MODULES`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser", "COMMAND_MODULES"]

#: modules providing subcommands (each defines ``register_cli(subparsers)``)
COMMAND_MODULES = (
    "dynlrp_fx.commands",
    "dynlrp_fx.coverage",
    "dynlrp_fx.export",
    "dynlrp_fx.demo",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="dynlrp",
        description="dynlrp-fx: Layer-wise Relevance Propagation for any PyTorch model (torch.fx graph compiler).",
    )
    parser.add_argument("--version", action="version", version=f"dynlrp-fx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # feature module not present in this build
            raise
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
