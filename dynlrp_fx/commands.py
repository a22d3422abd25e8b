"""Basic subcommands: ``dynlrp info`` (versions, rule table size, passes)."""

from __future__ import annotations

import argparse

__all__ = ["register_cli"]


def _info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__
    from .passes import PIPELINE
    from .presets import PRESETS
    from .rules.table import OP_TABLE

    print(f"dynlrp-fx {__version__}, torch {torch.__version__}")
    print(f"op table: {len(OP_TABLE)} ATen overloads; presets: {', '.join(sorted(PRESETS))}")
    print("passes:")
    print("  " + repr(PIPELINE).replace("\n", "\n  "))
    return 0


def register_cli(sub) -> None:
    """Add the ``info`` subcommand."""
    p = sub.add_parser("info", help="print versions, rule table size and the compiler passes")
    p.set_defaults(func=_info)
