"""``dynlrp explain``: one-off explanations from the shell.

``dynlrp explain --model my_pkg.models:make_model --input x.pt [--target 3] [--rules lrp0] [--out r.pt]
[--png r.png]`` imports ``make_model`` from ``my_pkg.models``, calls it with no arguments to get the
``nn.Module``, loads the input batch (``.pt``: a tensor saved with ``torch.save``; ``.npy``: a NumPy array),
explains it and prints, per sample, the explained output index and value, the conservation error and the most
relevant input positions. ``--out`` saves a dict of tensors (``relevance``, ``output``, ``target``, ``seed``,
``absorbed``) with ``torch.save``; ``--png`` writes a grid of relevance overlays for image inputs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from torch import nn

from ..errors import DynlrpError
from ._models import load_factory, load_input

__all__ = ["register_cli", "run", "load_factory", "load_input"]


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    p = next(iter(model.parameters()), None)
    return p.dtype if p is not None else None


def run(args: argparse.Namespace) -> int:
    """Run ``dynlrp explain`` (see module doc); returns the exit code."""
    from ..explainer import compile as dynlrp_compile

    try:
        model = load_factory(args.model)
        x = load_input(args.input)
    except (DynlrpError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"dynlrp explain: {e}", file=sys.stderr)
        return 2
    if args.single:
        x = x.unsqueeze(0)
    dt = _model_dtype(model)
    if x.is_floating_point() and dt is not None and x.dtype != dt:
        x = x.to(dt)
    target: Any = None if args.target in (None, "argmax") else int(args.target)
    explainer = dynlrp_compile(model, x, rules=args.rules, backend=args.backend)
    expl = explainer(x, target=target)
    flat_out = expl.output.reshape(expl.output.shape[0], -1)
    tgt = flat_out.argmax(1) if target is None else torch.full((x.shape[0],), target)
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
    if args.out:
        torch.save(
            {
                "relevance": expl.relevance,
                "output": expl.output,
                "target": tgt,
                "seed": expl.conservation.seed,
                "absorbed": expl.absorbed,
            },
            args.out,
        )
        print(f"wrote {args.out}")
    if args.png:
        from .. import viz

        if expl.relevance.ndim not in (3, 4):
            print(f"dynlrp explain: --png needs image inputs (N, C, H, W), got shape {tuple(x.shape)}", file=sys.stderr)
            return 2
        rel = expl.relevance if expl.relevance.ndim == 4 else expl.relevance.unsqueeze(1)
        img = x if x.ndim == 4 else x.unsqueeze(1)
        viz.image_grid(rel, images=img, path=args.png)
        print(f"wrote {args.png}")
    return 0


def register_cli(sub: Any) -> None:
    """Add the ``explain`` subcommand."""
    p = sub.add_parser(
        "explain",
        help="explain a model (module:factory) on an input file from the shell",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("--model", required=True, help="module:factory returning the nn.Module (called with no args)")
    p.add_argument("--input", required=True, help="input batch: .pt tensor (torch.save) or .npy array")
    p.add_argument("--target", default=None, help="output index to explain (default: argmax per sample)")
    p.add_argument("--rules", default="epsilon", help="rules preset (epsilon, lrp0, ...)")
    p.add_argument("--backend", default="eager", help="eager (default) or inductor")
    p.add_argument("--single", action="store_true", help="the input is one sample without a batch dimension")
    p.add_argument("--top", type=int, default=5, help="how many of the most relevant inputs to print")
    p.add_argument("--out", default=None, help="save relevance, output, target, seed, absorbed here (torch.save)")
    p.add_argument("--png", default=None, help="write a PNG grid of relevance overlays (image inputs)")
    p.set_defaults(func=run)
