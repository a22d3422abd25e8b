"""``dynlrp coverage``: every ATen op of a model (or the built-in zoo) with its rule class
(:func:`dynlrp_fx.coverage`); exit code 1 when anything is uncovered, fails to trace or explain, or relevance is
not finite, 2 for usage errors."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..coverage import (
    CoverageReport,
    coverage,
    render_json,
    render_markdown,
    render_non_core_markdown,
    render_text,
    zoo_coverage,
)
from ._errors import EXPECTED, fail
from ._models import model_from_args

__all__ = ["register_cli", "run"]


def run(args: argparse.Namespace) -> int:
    """Run ``dynlrp coverage``; returns the exit code."""
    reports: list[CoverageReport] = []
    quiet = args.json or args.markdown

    def progress(r: CoverageReport) -> None:
        if args.verbose:
            print(f"[{r.name}: {'ok' if r.ok else 'FAIL'} {r.seconds:.1f} s]", file=sys.stderr, flush=True)

    try:
        if args.zoo or args.names:
            names = [n for n in args.names.split(",") if n] if args.names else None
            if names is not None:
                from .. import zoo

                for n in names:
                    zoo.get(n)  # KeyError listing the valid names
            reports = zoo_coverage(
                names, full=args.full, rules=args.rules, explain=not args.no_explain, progress=progress
            )
        elif args.model:
            model, example = model_from_args(args)
            reports = [coverage(model, example, rules=args.rules, explain=not args.no_explain, name=args.model)]
        else:
            print("dynlrp coverage: error: give --model MODULE:CALLABLE --input-shape ..., or --zoo", file=sys.stderr)
            return 2
    except EXPECTED as e:
        return fail(args, "coverage", e, code=1)
    if args.json:
        print(render_json(reports, ops=args.ops))
    elif args.markdown:
        print(render_markdown(reports, title=args.title), end="")
        if args.non_core:
            print(render_non_core_markdown(), end="")
    else:
        print(render_text(reports, ops=not args.zoo or args.ops))
    failed = [r for r in reports if not r.ok]
    if failed and not quiet:
        print(
            f"\n{len(failed)} of {len(reports)} models not fully covered/explained: {', '.join(r.name for r in failed)}"
        )
    for r in failed:
        for op, paths in r.uncovered.items():
            print(f"dynlrp coverage: {r.name}: no rule for {op} (used by {', '.join(paths)})", file=sys.stderr)
        if r.error:
            print(f"dynlrp coverage: {r.name}: {r.error}", file=sys.stderr)
        elif r.finite is False:
            print(f"dynlrp coverage: {r.name}: non-finite relevance", file=sys.stderr)
    return 1 if failed else 0


def register_cli(sub: Any) -> None:
    """Add the ``coverage`` subcommand."""
    p = sub.add_parser(
        "coverage",
        help="report every ATen op of a model (or the built-in zoo) with its rule class; exit 1 if any is uncovered",
        description="Trace a model (or the zoo) and list every ATen op with its node count, rule class and module "
        "paths. Uncovered ops are listed with the module paths that use them; the exit code is 1 when anything is "
        "uncovered, a model fails to trace or explain, or relevance is not finite.",
    )
    src = p.add_argument_group("model")
    src.add_argument(
        "--model",
        metavar="MODULE:CALLABLE",
        help="a factory returning the nn.Module (e.g. torchvision:resnet18 or mypkg.models:build)",
    )
    src.add_argument(
        "--input-shape",
        action="append",
        metavar="B,...",
        help="shape of a random (randn) example input; repeat for several positional inputs",
    )
    src.add_argument("--dtype", default="float32", help="model and input dtype for --model (default float32)")
    src.add_argument("--seed", type=int, default=0, help="torch.manual_seed before building --model (default 0)")
    src.add_argument("--zoo", action="store_true", help="run the built-in zoo (dynlrp_fx.zoo)")
    src.add_argument("--names", default="", help="comma-separated zoo entries (implies --zoo)")
    src.add_argument("--full", action="store_true", help="zoo: build the full-size configurations (slow)")
    p.add_argument("--rules", default=None, help="rules preset (default epsilon)")
    p.add_argument("--no-explain", action="store_true", help="only analyse coverage; skip the explanation run")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="machine-readable JSON output")
    fmt.add_argument("--markdown", action="store_true", help="a markdown table (docs/coverage.md)")
    p.add_argument("--ops", action="store_true", help="include per-op rows in --json / zoo text output")
    p.add_argument("--title", default=None, help="--markdown: a heading line")
    p.add_argument("--non-core", action="store_true",
                   help="--markdown: append the ops outside Core ATen that have rules (docs/coverage.md)")
    p.add_argument("-v", "--verbose", action="store_true", help="print progress per model to stderr")
    p.set_defaults(func=run)
