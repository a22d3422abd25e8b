"""``dynlrp info``: versions, op table size, presets and the compiler passes; ``dynlrp info --op OP [--rules NAME]``:
what the op table and the rule presets say about one op (:func:`dynlrp_fx.rules.describe_op`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._errors import fail

__all__ = ["register_cli", "run"]


def run(args: argparse.Namespace) -> int:
    """Run ``dynlrp info``; returns the exit code (2 for an unknown op or preset)."""
    if args.op is not None:
        from ..rules import describe_op

        try:
            print(describe_op(args.op, rules=args.rules))
        except (ValueError, TypeError) as e:
            return fail(args, "info", e, code=2)
        return 0
    if args.rules is not None:
        print("dynlrp info: error: --rules needs --op", file=sys.stderr)
        return 2

    import torch

    from .. import __version__
    from ..passes import PIPELINE
    from ..presets import PRESETS
    from ..rules.table import OP_TABLE

    print(f"dynlrp-fx {__version__}, torch {torch.__version__}")
    print(f"op table: {len(OP_TABLE)} ATen overloads; presets: {', '.join(sorted(PRESETS))}")
    print("passes:")
    print("  " + repr(PIPELINE).replace("\n", "\n  "))
    return 0


def register_cli(sub: Any) -> None:
    """Add the ``info`` subcommand."""
    p = sub.add_parser(
        "info",
        help="print versions, rule table size and the compiler passes, or (--op) how one op is explained",
        description="Without --op: versions, op table size, presets and the compiler passes. With --op: the op's "
        "op-table entry (kind, factors, slots, facts), the rule classes it can get and the rule of the default "
        "preset (epsilon) and of --rules for each.",
    )
    p.add_argument(
        "--op",
        default=None,
        metavar="OP",
        help="an ATen op: aten.bmm (every overload), aten.bmm.default or torch.ops.aten.bmm",
    )
    p.add_argument("--rules", default=None, metavar="NAME", help="--op: also show this rules preset's rules")
    p.set_defaults(func=run)
