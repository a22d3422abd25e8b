"""``dynlrp export``: compile a model's explainer and save its relevance program as a ``.pt2`` file
(:func:`dynlrp_fx.export`)."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from ..export import PACKAGES, export
from ._errors import EXPECTED, fail, make_parent, output_path
from ._models import model_from_args

__all__ = ["register_cli", "run"]


def run(args: argparse.Namespace) -> int:
    """Run ``dynlrp export``; returns the exit code (1 on errors, reported in one line). Missing parent directories
    of ``-o`` are created."""
    from ..explainer import compile as dynlrp_compile

    try:
        output_path(args.output, "-o")
        model, example = model_from_args(args)
        t0 = time.perf_counter()
        explainer = dynlrp_compile(model, example, rules=args.rules, backend="eager")
        t1 = time.perf_counter()
        modes = tuple(args.modes.split(","))
        export(explainer, make_parent(args.output), package=args.package, modes=modes)
        t2 = time.perf_counter()
    except EXPECTED as e:
        return fail(args, "export", e, code=1)
    size = os.path.getsize(args.output)
    print(
        f"wrote {args.output} ({size / 2**20:.2f} MiB, package={args.package}, rules={explainer.composite.name}, "
        f"modes={','.join(modes)}): compile {t1 - t0:.1f} s, export {t2 - t1:.1f} s"
    )
    return 0


def register_cli(sub: Any) -> None:
    """Add the ``export`` subcommand."""
    p = sub.add_parser(
        "export",
        help="export a model's relevance program as a .pt2 file (runs without the model's code)",
        description="Compile MODEL's LRP explainer and save its forward+relevance graph as a .pt2 file; load it "
        "with dynlrp_fx.load(path).",
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="MODULE:CALLABLE",
        help="a factory returning the nn.Module, e.g. torchvision.models:resnet18 (short: "
        "torchvision:resnet18) or mypkg.models:build",
    )
    p.add_argument(
        "--input-shape",
        required=True,
        action="append",
        metavar="B,C,H,W",
        help="shape of a random (randn) example input; repeat for several positional inputs; the batch "
        "dimension stays dynamic",
    )
    p.add_argument("--dtype", default="float32", help="example input and model dtype (default float32)")
    p.add_argument("--rules", default="epsilon", help="rules preset (default epsilon)")
    p.add_argument(
        "--package",
        choices=PACKAGES,
        default="exported",
        help="exported: torch.export programs; aoti: AOTInductor-compiled kernels (slow to export)",
    )
    p.add_argument("--modes", default="target,seed", help="seed modes to store: target,seed (default both)")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed before building the model (default 0)")
    p.add_argument(
        "-o", "--output", required=True, metavar="PATH", help="the .pt2 file to write (missing directories are created)"
    )
    p.set_defaults(func=run)
