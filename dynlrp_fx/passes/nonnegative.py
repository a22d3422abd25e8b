"""Non-negativity analysis: which values are provably ``>= 0`` (read by ``assign_rules`` for the rules' fast paths)."""

from __future__ import annotations

import operator

import torch

from ..rules.table import facts
from .nodes import is_float_value, tensor_slots

__all__ = ["nonnegative_nodes", "relevance_only_where_positive"]


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


_aten = torch.ops.aten
#: elementwise ops with ``f(v) = 0`` wherever ``v <= 0`` (and ``f(0) = 0``)
_RELU = frozenset({_aten.relu.default})
#: ops whose output elements are copies of input elements: an output element that copies a zero is zero
_COPIES = frozenset({
    _aten.view.default, _aten._unsafe_view.default, _aten.reshape.default, _aten.alias.default, _aten.clone.default,
    _aten.permute.default, _aten.transpose.int, _aten.t.default, _aten.expand.default, _aten.unsqueeze.default,
    _aten.squeeze.dim, _aten.squeeze.dims, _aten.squeeze.default, _aten.flatten.using_ints, _aten.slice.Tensor,
    _aten.select.int, _aten.cat.default, _aten.max_pool2d_with_indices.default,
    _aten.max_pool3d_with_indices.default, _aten.contiguous.default,
})


def relevance_only_where_positive(gm: torch.fx.GraphModule) -> set:
    """Nodes whose relevance is provably zero wherever their value is ``<= 0``, read after rules are assigned.

    That holds for ``z`` when every user of ``z`` is a ReLU passing relevance unchanged (``Identity``/``Pass``)
    whose own relevance is zero wherever it is zero; a value ``v`` has that property when every op reading it
    as a data operand either gives relevance in proportion to it (``Rule.input_proportional``: epsilon, gamma,
    z+, alpha-beta) or copies it (views, concatenation, max-pool winners, ReLU) into a value that has the property
    in turn. The model's outputs do not (the seed is arbitrary). Gamma reads it: ``u^- = 0`` there, one pullback
    instead of two (:class:`~dynlrp_fx.rules.lrp.Gamma`)."""
    from ..rules.core import Identity, Route
    from ..rules.lrp import Pass

    zero_where_zero: dict = {}

    def passes_on(u: torch.fx.Node, copies: frozenset, rules: tuple) -> bool:
        rule = getattr(u.meta.get("dynlrp"), "rule", None)
        return u.target in copies and isinstance(rule, rules) and zero_at_zero(u)

    def reads_safely(v: torch.fx.Node, u: torch.fx.Node) -> bool:
        """Whether the relevance ``u`` gives ``v`` is zero wherever ``v`` is zero."""
        if u.op != "call_function":
            return False  # the output: the seed
        if u.target is operator.getitem:  # (value, indices) of max pooling: the value is a copy
            return u.args[1] != 0 or zero_at_zero(u)
        ann = u.meta.get("dynlrp")
        if ann is None or ann.rule is None:
            return True  # no relevance flows through u (a shape computation, a mask)
        slots = [s for s, a in tensor_slots(u) if a is v and s in ann.slots]
        if not slots:
            return True
        if ann.rule.input_proportional:
            return True
        return passes_on(u, _COPIES, (Route,)) or passes_on(u, _RELU, (Identity, Pass))

    def zero_at_zero(v: torch.fx.Node) -> bool:
        if v not in zero_where_zero:
            zero_where_zero[v] = bool(v.users) and all(reads_safely(v, u) for u in v.users)
        return zero_where_zero[v]

    for n in reversed(gm.graph.nodes):  # users first: the recursion stays shallow
        zero_at_zero(n)
    return {
        n for n in gm.graph.nodes
        if n.op == "call_function" and n.users and all(passes_on(u, _RELU, (Identity, Pass)) for u in n.users)
    }
