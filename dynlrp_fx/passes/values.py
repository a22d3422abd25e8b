"""Value numbering: which pure ATen calls of a graph compute the same value (shared by CSE and pattern analyses)."""

from __future__ import annotations

import operator
from typing import Any

import torch

from ..rules.table import facts
from .nodes import size_key

__all__ = ["cse_key", "value_numbers"]


def _freeze(a: Any, canon: dict) -> Any:
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, tuple(_freeze(x, canon) for x in a))
    if isinstance(a, dict):
        return ("dict", tuple(sorted((k, _freeze(v, canon)) for k, v in a.items())))
    if isinstance(a, torch.fx.Node):
        return ("Node", canon.get(a, a))
    if isinstance(a, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(a)
    if isinstance(a, (int, float, bool, str, type(None))):
        return (type(a).__name__, a)
    raise TypeError  # anything else (tensors, symbolic values): not merged


_aten = torch.ops.aten


def _is_reshape(node: Any) -> bool:
    """A reshape (an op the table marks :attr:`~dynlrp_fx.rules.table.OpSpec.reshape`) or an identity ``permute``."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    if node.target is _aten.permute.default:
        return list(node.args[1]) == list(range(len(node.args[1])))
    return facts(node.target).reshape


def _reshape_key(node: torch.fx.Node, canon: dict) -> Any:
    """``("reshape", base, shape, dtype)`` for a chain of reshapes of one base: ``view(view(x, s1), s2)`` and
    ``view(x, s2)`` hold the same values (the conservation ledger sums a relevance tensor reached through two
    view chains). ``None`` without a shape to compare."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    base = node
    while _is_reshape(base):
        base = base.args[0]
    if not isinstance(base, torch.fx.Node):
        return None
    return ("reshape", canon.get(base, base), tuple(map(size_key, val.shape)), val.dtype)


def cse_key(node: torch.fx.Node, canon: dict) -> Any:
    """A hashable key of a pure ATen call (operands by value number), or ``None`` when it must not be merged."""
    op = node.target
    if node.op == "call_function" and op is operator.getitem:
        # one output of a multi-output op, by the op's value number (a recomputed batch norm's output is its
        # forward twin's)
        try:
            return (op, _freeze(node.args, canon))
        except TypeError:
            return None
    if node.op != "call_function" or not isinstance(op, torch._ops.OpOverload):
        return None
    if op._schema.is_mutable or torch.Tag.nondeterministic_seeded in op.tags:
        return None
    if _is_reshape(node):
        return _reshape_key(node, canon)
    try:
        return (op, _freeze(node.args, canon), _freeze(node.kwargs, canon))
    except TypeError:
        return None


def value_numbers(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, torch.fx.Node]:
    """``{node: first node computing the same value}`` for pure ATen calls that repeat an earlier one (operands
    compared by value number, so ``x - mean(x)`` written twice maps to its first occurrence)."""
    canon: dict[torch.fx.Node, torch.fx.Node] = {}
    seen: dict[Any, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        key = cse_key(node, canon)
        if key is None:
            continue
        prev = seen.setdefault(key, node)
        if prev is not node:
            canon[node] = prev
    return canon
