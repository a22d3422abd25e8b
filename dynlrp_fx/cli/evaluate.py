"""``dynlrp evaluate``: rank rule presets by faithfulness (perturbation curves) from the shell.

``dynlrp evaluate --model my_pkg.models:make_model --input x.pt [--rules lrp0,epsilon_plus,gradient] [--target 3]
[--steps 16] [--baseline blur] [--region 2] [--plot curves.png]`` imports ``make_model`` from ``my_pkg.models``,
calls it with no arguments to get the ``nn.Module``, loads the input batch (``.pt`` or ``.npy``), explains it with
every rules preset of ``--rules`` (default: the presets that apply to the model, plus gradient x input), evaluates
each with MoRF / LeRF perturbation curves (:func:`dynlrp_fx.select_rules`) and prints the ranking as a Markdown
table (ABPC: area between the curves, higher is more faithful; SE: its standard error). ``--plot`` writes the
mean MoRF and LeRF curves of every preset (a PNG; missing parent directories are created).

Errors are one line on stderr (see :mod:`dynlrp_fx.cli`): exit code 2 for a bad ``--model``, ``--input`` file,
``--rules`` preset, ``--baseline`` or ``--plot`` path (checked before anything runs), 1 when the model cannot be
traced, explained or evaluated on the input, or the plot cannot be written.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..errors import DynlrpError
from ._errors import EXPECTED, UsageError, fail, make_parent, output_path
from ._models import load_factory, load_input
from .explain import _as_batch, _input_problem, _target

__all__ = ["register_cli", "run"]

_BASELINES = ("blur", "zero", "mean")


def _rules(text: str | None) -> list[str] | None:
    """``--rules a,b,c`` -> the checked preset names (``None``: the defaults)."""
    from ..presets import PRESETS

    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UsageError(f"--rules {text!r}: give comma-separated preset names, e.g. lrp0,epsilon_plus,gradient")
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise UsageError(f"--rules: unknown preset{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"presets: {', '.join(sorted(PRESETS))}")
    return names


def _region(text: str | None) -> int | tuple[int, ...] | None:
    if text is None:
        return None
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise UsageError(
            f"--region {text!r}: give a patch size in pixels such as 2, or one per dimension: 2,2"
        ) from None
    if any(s < 1 for s in sizes):
        raise UsageError(f"--region {text!r}: patch sizes must be positive")
    return sizes[0] if len(sizes) == 1 else sizes


def run(args: argparse.Namespace) -> int:
    """Run ``dynlrp evaluate`` (see module doc); returns the exit code: 2 for bad arguments, 1 when the model
    cannot be explained or evaluated on the input or the plot cannot be written."""
    from ..evaluate import select_rules

    try:
        rules = _rules(args.rules)
        region = _region(args.region)
        if args.steps < 1:
            raise UsageError(f"--steps {args.steps}: give a positive number of perturbation steps, e.g. 16")
        if args.plot:
            output_path(args.plot, "--plot")
        model = load_factory(args.model)
        x = load_input(args.input)
    except (DynlrpError, ValueError, OSError, ImportError) as e:
        return fail(args, "evaluate", e, code=2)
    try:
        x = _as_batch(model, x, args.single)
        if not x.is_floating_point():
            raise UsageError(f"--input {args.input}: dynlrp evaluate takes float inputs (images, features); for token "
                             "inputs use dynlrp.select_rules from Python")
        problem = _input_problem(model, x, args, None)
        if problem is not None:
            raise problem
        t0 = time.perf_counter()
        ranking = select_rules(model, x, args.target, candidates=rules, steps=args.steps, baseline=args.baseline,
                               sigma=args.sigma, region=region, score=args.score, backend=args.backend)
        seconds = time.perf_counter() - t0
        print(f"{x.shape[0]} samples, {args.steps} steps, baseline {args.baseline}, score {args.score}, "
              f"region {args.region or 1}; {seconds:.1f} s")
        print(ranking)
        print(f"best: {ranking.best_name} (use it: dynlrp explain ... --rules {ranking.best_name})")
        if args.plot:
            fig = ranking.plot()
            fig.savefig(make_parent(args.plot), dpi=100)
            print(f"wrote {args.plot}")
    except EXPECTED as e:
        return fail(args, "evaluate", e)
    return 0


def register_cli(sub: Any) -> None:
    """Add the ``evaluate`` subcommand."""
    p = sub.add_parser(
        "evaluate",
        help="rank rule presets by faithfulness (MoRF/LeRF perturbation, ABPC) on an input file",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("--model", required=True, help="module:factory returning the nn.Module (called with no args)")
    p.add_argument("--input", required=True, help="input batch: .pt tensor (torch.save) or .npy array")
    p.add_argument("--rules", default=None,
                   help="comma-separated presets to compare (default: those that apply to the model, plus gradient)")
    p.add_argument("--target", type=_target, default=None,
                   help="output index to explain and score (default: argmax per sample)")
    p.add_argument("--steps", type=int, default=16, help="perturbation steps (default 16)")
    p.add_argument("--baseline", choices=_BASELINES, default="blur", help="what removed pixels become (default blur)")
    p.add_argument("--sigma", type=float, default=None, help="blur sigma in pixels (default max(1, min(H, W) / 16))")
    p.add_argument("--region", default=None, help="perturb patches of this many pixels (e.g. 2 or 2,2)")
    p.add_argument("--score", choices=("probability", "logit"), default="probability",
                   help="what the curves measure at the target (default probability: softmax)")
    p.add_argument("--backend", default="eager", help="eager (default) or inductor")
    p.add_argument("--single", action="store_true", help="the input is one sample without a batch dimension")
    p.add_argument("--plot", default=None, help="write the MoRF/LeRF curves of every preset here (PNG)")
    p.set_defaults(func=run)
