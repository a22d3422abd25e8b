"""``detect_normalizers``: products whose second factor is a function of the first (normalisers, activations)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..rules.table import facts
from .nodes import FLOAT, OTHER, NodeAnn, tensor_slots
from .values import value_numbers

__all__ = ["detect_normalizers"]

if TYPE_CHECKING:
    from .pipeline import CompileContext


def _data_args(n: torch.fx.Node) -> list[torch.fx.Node]:
    return [x for s, x in tensor_slots(n) if (x.meta.get("dynlrp") or NodeAnn(OTHER)).status == FLOAT]


def _reaches(
    b: torch.fx.Node, bases: set, fact: str, need_reduction: bool, limit: int = 32, canon: dict | None = None
) -> bool:
    """True when every data path upwards from ``b`` through ops with the table fact ``fact`` (``"scale"`` or
    ``"activation"``) ends in ``bases`` (and, with ``need_reduction``, every path passes a reduction); ``canon`` maps nodes to the first node computing the same
    value (:func:`~dynlrp_fx.passes.values.value_numbers`), so a recomputed copy of a base counts as the base."""
    canon = canon or {}
    found = False
    stack = [(b, False)]
    steps = 0
    while stack:
        n, red = stack.pop()
        steps += 1
        if steps > limit:
            return False
        if canon.get(n, n) in bases:
            if need_reduction and not red:
                return False
            found = True
            continue
        ann = n.meta.get("dynlrp")
        if ann is None or ann.status != FLOAT:
            continue  # constants are fine
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            return False
        spec = facts(n.target)
        if not getattr(spec, fact):
            return False
        data_args = _data_args(n)
        if not data_args:
            return False
        for x in data_args:
            stack.append((x, red or spec.reduction))
    return found


def _strip_scaling(n: torch.fx.Node) -> list[torch.fx.Node]:
    """``n`` and the values it is a constant rescaling or cast of (``x``, ``0.5 * x``, ``x.float()``...)."""
    chain = [n]
    while n.op == "call_function" and getattr(n.target, "_opname", "") in ("_to_copy", "clone", "alias", "mul", "div"):
        data = _data_args(n)
        if len(data) != 1 or (n.target._opname == "div" and n.args[0] is not data[0]):
            break
        n = data[0]
        chain.append(n)
    return chain


def _centered(n: torch.fx.Node) -> torch.fx.Node | None:
    """``u`` when ``n`` is ``u - mean(u, dims, keepdim=True)`` (its variance is ``u``'s: ``x.var()`` scales it)."""
    if n.op != "call_function" or getattr(n.target, "_opname", "") != "sub" or len(n.args) < 2:
        return None
    u, m = n.args[0], n.args[1]
    if not (isinstance(u, torch.fx.Node) and isinstance(m, torch.fx.Node)) or m.op != "call_function":
        return None
    if getattr(m.target, "_opname", "") == "mean" and m.args and m.args[0] is u and n.kwargs.get("alpha", 1) == 1:
        return u
    return None


def detect_normalizers(gm: torch.fx.GraphModule, ctx: CompileContext) -> torch.fx.GraphModule:
    """Mark products whose second factor is a function of the first as identity to the first factor.

    * normalisers: ``a * g(reduce(a))`` and ``a / g(reduce(a))`` (RMSNorm, decomposed LayerNorm): nothing flows
      into the variance path (AttnLRP);
    * decomposed activations: ``a * g(a)`` with ``g`` elementwise (``x * sigmoid(x)``, GELU-tanh
      ``0.5x * (1 + tanh(...x...))``): the activation as a whole gets the identity rule.

    Sets ``ann.extra["normalizer_slot"]`` to the slot of ``a``; the node's rule class becomes ``normalizer``.
    Values are compared by value number: in ConvNeXt's ``(x - u) / sqrt(((x - u) ** 2).mean() + eps)`` the two
    ``x - u`` are one value; a centred value ``x - mean(x)`` may also be scaled by a function of ``x`` itself
    (``(x - mean(x)) / sqrt(x.var() + eps)``).
    """
    del ctx  # reads nothing from the context
    canon = value_numbers(gm)
    for node in gm.graph.nodes:
        ann = node.meta.get("dynlrp")
        if ann is None or ann.status != FLOAT or node.op != "call_function":
            continue
        name = getattr(node.target, "_opname", "")
        if name not in ("mul", "div") or len(ann.slots) != 2:
            continue
        s0, s1 = ann.slots
        x0, x1 = node.args[s0[0]], node.args[s1[0]]
        pairs = [(s0, x0, x1), (s1, x1, x0)] if name == "mul" else [(s0, x0, x1)]
        for slot, a, b in pairs:
            bases = {canon.get(x, x) for x in _strip_scaling(a)}
            bases |= {canon.get(u, u) for u in map(_centered, list(bases)) if u is not None}
            if _reaches(b, bases, "scale", True, canon=canon):
                ann.extra["normalizer_slot"] = slot
                ann.extra["pattern"] = "normalizer"
                break
            if name == "mul" and _reaches(b, bases, "activation", False, canon=canon):
                ann.extra["normalizer_slot"] = slot
                ann.extra["pattern"] = "activation"
                break
    return gm

