"""``dynlrp explain``: one-off explanations from the shell.

``dynlrp explain --model my_pkg.models:make_model --input x.pt [--target 3] [--rules lrp0] [--out r.pt]
[--png r.png]`` imports ``make_model`` from ``my_pkg.models``, calls it with no arguments to get the
``nn.Module``, loads the input batch (``.pt``: a tensor saved with ``torch.save``; ``.npy``: a NumPy array),
explains it and prints, per sample, the explained output index and value, the conservation error and the most
relevant input positions. ``--out`` saves a dict of tensors (``relevance``, ``output``, ``target``, ``seed``,
``absorbed``) with ``torch.save``; ``--png`` writes a grid of relevance overlays for image inputs. Missing parent
directories of ``--out`` and ``--png`` are created.

Errors are one line on stderr (see :mod:`dynlrp_fx.cli`): exit code 2 for a bad ``--model``, ``--input`` file,
``--rules`` preset, ``--target`` or output path (checked before the model is compiled), 1 when the model cannot be
traced or explained on the input (a target out of range, an input of the wrong shape or dtype) or a file cannot be
written.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import torch
from torch import nn

from ..errors import DynlrpError, DynlrpInputError
from ._errors import EXPECTED, UsageError, fail, make_parent, one_line, output_path
from ._models import load_factory, load_input

__all__ = ["register_cli", "run", "load_factory", "load_input"]


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    p = next(iter(model.parameters()), None)
    return p.dtype if p is not None else None


def _target(text: str) -> int | None:
    """``--target``: an output index, or ``argmax`` / ``-1`` (the argmax per sample) as ``None``."""
    if text.strip().lower() in ("argmax", "none", "-1"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an output index: give an integer such as 3, or argmax (the default)"
        ) from None


def _as_batch(model: nn.Module, x: torch.Tensor, single: bool) -> torch.Tensor:
    """The input as the model takes it: a batch dimension added for ``--single``, floats in the model's dtype."""
    if single:
        x = x.unsqueeze(0)
    dt = _model_dtype(model)
    if x.is_floating_point() and dt is not None and x.dtype != dt:
        x = x.to(dt)
    return x


def _target_problem(exc: DynlrpInputError, target: int | None) -> DynlrpInputError:
    """The explainer refused ``--target``: the message in terms of the flag."""
    m = re.search(r"out of range(?: for '[^']*')?: each sample's output has (\d+) entries", str(exc))
    if m:
        n = int(m.group(1))
        return DynlrpInputError(
            f"--target {target} out of range: each sample's output has {n} entries; give 0..{n - 1}, or argmax "
            "(the default)"
        )
    return DynlrpInputError(f"--target {target}: {exc}" if "target" in str(exc) else str(exc))


def _input_problem(model: nn.Module, x: torch.Tensor, args: argparse.Namespace,
                   exc: BaseException | None) -> BaseException | None:
    """After ``compile`` failed: if the model does not even run eagerly on the input, the input is the problem (its
    shape or dtype); say so, naming the file. Otherwise ``exc`` itself."""
    try:
        with torch.no_grad():
            model(x)
    except Exception as e:  # noqa: BLE001 - any failure of the user's model on this input
        first = one_line(e, 300)
        dt = _model_dtype(model)
        if not x.is_floating_point() and dt is not None and dt.is_floating_point:
            hint = f" (the model's parameters are {str(dt).removeprefix('torch.')}: save a floating-point input)"
        elif not args.single:
            hint = " (--single if the file holds one sample without a batch dimension)"
        else:
            hint = ""
        return DynlrpError(
            f"--input {args.input}: the model fails on this input of shape {tuple(x.shape)}, dtype "
            f"{str(x.dtype).removeprefix('torch.')}: {type(e).__name__}: {first}; check the input's shape and "
            f"dtype against what {args.model} expects{hint}"
        )
    return exc


def run(args: argparse.Namespace) -> int:
    """Run ``dynlrp explain`` (see module doc); returns the exit code: 2 for bad arguments (model spec, input file,
    preset, output path), 1 when the model cannot be explained on the input or a file cannot be written."""
    from ..explainer import compile as dynlrp_compile
    from ..presets import resolve

    try:
        try:
            resolve(args.rules)
        except ValueError as e:
            raise UsageError(f"--rules: {e}") from None
        for flag, path in (("--out", args.out), ("--png", args.png)):
            if path:
                output_path(path, flag)
        model = load_factory(args.model)
        x = load_input(args.input)
    except (DynlrpError, ValueError, OSError, ImportError) as e:
        return fail(args, "explain", e, code=2)
    try:
        x = _as_batch(model, x, args.single)
        target = args.target
        # an input the model cannot run on is named as such before tracing: torch.export's fake tensors do not
        # check every dtype (an integer input into a float Linear traces), so compile alone would not catch it
        problem = _input_problem(model, x, args, None)
        if problem is not None:
            raise problem
        try:
            explainer = dynlrp_compile(model, x, rules=args.rules, backend=args.backend)
        except Exception as e:  # noqa: BLE001 - an input the model cannot run on is named as such, else re-raised
            problem = _input_problem(model, x, args, e)
            if problem is e:
                raise
            raise problem from e
        try:
            expl = explainer(x, target=target)
        except DynlrpInputError as e:
            raise _target_problem(e, target) from e
        _report(args, x, expl, target)
        if args.out:
            torch.save(
                {
                    "relevance": expl.relevance,
                    "output": expl.output,
                    "target": _targets(expl, target),
                    "seed": expl.conservation.seed,
                    "absorbed": expl.absorbed,
                },
                make_parent(args.out),
            )
            print(f"wrote {args.out}")
        if args.png:
            from .. import viz

            if expl.relevance.ndim not in (3, 4):
                raise UsageError(f"--png needs image inputs (N, C, H, W), got shape {tuple(x.shape)}; drop --png")
            rel = expl.relevance if expl.relevance.ndim == 4 else expl.relevance.unsqueeze(1)
            img = x if x.ndim == 4 else x.unsqueeze(1)
            viz.image_grid(rel, images=img, path=make_parent(args.png))
            print(f"wrote {args.png}")
    except EXPECTED as e:
        return fail(args, "explain", e)
    return 0


def _targets(expl: Any, target: int | None) -> torch.Tensor:
    flat_out = expl.output.reshape(expl.output.shape[0], -1)
    return flat_out.argmax(1) if target is None else torch.full((flat_out.shape[0],), target)


def _report(args: argparse.Namespace, x: torch.Tensor, expl: Any, target: int | None) -> None:
    """Per sample: the explained output index and value, relevance sum, absorbed relevance, conservation error
    and the ``--top`` most relevant inputs."""
    flat_out = expl.output.reshape(expl.output.shape[0], -1)
    tgt = _targets(expl, target)
    err = expl.conservation.error
    for i in range(x.shape[0]):
        r = expl.relevance[i].reshape(-1)
        top = r.abs().argsort(descending=True)[: args.top].tolist()
        tops = ", ".join(f"#{j}: {float(r[j]):+.4g}" for j in top)
        print(
            f"sample {i}: output[{int(tgt[i])}] = {float(flat_out[i, tgt[i]]):.6g}, relevance sum "
            f"{float(r.sum()):.6g}, absorbed {float(expl.absorbed[i]):.4g}, conservation error {float(err[i]):.2e}"
        )
        print(f"  most relevant inputs (flat index): {tops}")


def register_cli(sub: Any) -> None:
    """Add the ``explain`` subcommand."""
    p = sub.add_parser(
        "explain",
        help="explain a model (module:factory) on an input file from the shell",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("--model", required=True, help="module:factory returning the nn.Module (called with no args)")
    p.add_argument("--input", required=True, help="input batch: .pt tensor (torch.save) or .npy array")
    p.add_argument(
        "--target", type=_target, default=None, help="output index to explain (default: argmax per sample)"
    )
    p.add_argument("--rules", default="epsilon", help="rules preset (epsilon, lrp0, ...)")
    p.add_argument("--backend", default="eager", help="eager (default) or inductor")
    p.add_argument("--single", action="store_true", help="the input is one sample without a batch dimension")
    p.add_argument("--top", type=int, default=5, help="how many of the most relevant inputs to print")
    p.add_argument(
        "--out",
        default=None,
        help="save relevance, output, target, seed, absorbed here (torch.save; creates missing directories)",
    )
    p.add_argument(
        "--png",
        default=None,
        help="write a PNG grid of relevance overlays (image inputs; creates missing directories)",
    )
    p.set_defaults(func=run)
