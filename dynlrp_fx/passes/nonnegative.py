"""Non-negativity analysis: which values are provably ``>= 0`` (read by ``assign_rules`` for the rules' fast paths)."""

from __future__ import annotations

import operator

import torch

from ..rules.table import facts
from .nodes import is_float_value, tensor_slots

__all__ = ["nonnegative_nodes"]


def _clamp_floor(node: torch.fx.Node) -> float | None:
    """The lower bound of ``clamp``/``clamp_min``/``hardtanh`` as a number, if it is one."""
    name = node.target._opname
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min", node.kwargs.get("min_val", -1.0 if name == "hardtanh" else None))
    return float(lo) if isinstance(lo, (int, float)) else None


def nonnegative_nodes(gm: torch.fx.GraphModule) -> set:
    """Nodes whose value is provably ``>= 0`` (ReLU outputs and what pooling, reshaping, sums and products of
    such values give). Rules use it to skip the negative-input terms of gamma, z+ and alpha-beta."""
    nonneg: set = set()

    def tensor_args(n: torch.fx.Node) -> list:
        return [a for _, a in tensor_slots(n) if is_float_value(a.meta.get("val"))]

    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is operator.getitem:
            src = n.args[0]
            if n.args[1] == 0 and src in nonneg:
                nonneg.add(n)
            continue
        name = getattr(n.target, "_opname", "")
        kind = facts(n.target).nonneg
        if kind == "always":
            nonneg.add(n)
        elif kind == "floor":
            lo = _clamp_floor(n)
            if lo is not None and lo >= 0:
                nonneg.add(n)
        elif kind == "preserves":
            args = tensor_args(n)
            scalars = [
                a
                for a in (*n.args, *n.kwargs.values())
                if isinstance(a, (int, float)) and not isinstance(a, bool)
            ]
            if name in ("add", "mul") and any(a < 0 for a in scalars):
                continue  # relu(x) * -1, relu(x) + (-0.5), add(a, b, alpha=-1)
            if args and all(a in nonneg for a in args):
                nonneg.add(n)
    return nonneg

