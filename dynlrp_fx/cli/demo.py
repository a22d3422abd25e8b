"""``dynlrp demo``: the demo of :mod:`dynlrp_fx.demo` (pretrained MiniLM sentence encoder and a digits CNN)."""

from __future__ import annotations

import argparse
from typing import Any

from .. import demo as _demo
from ._errors import fail

__all__ = ["register_cli", "run"]


def run(args: argparse.Namespace) -> int:
    """Run ``dynlrp demo``; returns the exit code (2 when an optional dependency is missing)."""
    try:
        _demo.run_demo(args.out, text=not args.skip_text, digits=not args.skip_digits, backend=args.backend)
    except ModuleNotFoundError as e:
        return fail(args, "demo", e, code=2)
    return 0


def register_cli(sub: Any) -> None:
    """Add the ``demo`` subcommand."""
    p = sub.add_parser(
        "demo",
        help="explain a pretrained MiniLM (sentence similarity) and a digits CNN; write HTML/PNG heatmaps",
        description=_demo.__doc__.split("\n\n")[0],
    )
    p.add_argument("--out", default="out", help="output directory (default: out)")
    p.add_argument("--backend", default="eager", help="eager (default, no compile time) or inductor")
    p.add_argument("--skip-text", action="store_true", help="skip the MiniLM part")
    p.add_argument("--skip-digits", action="store_true", help="skip the digits CNN part")
    p.set_defaults(func=run)
