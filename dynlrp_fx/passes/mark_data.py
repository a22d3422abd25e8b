"""``mark_data``: which nodes carry data (relevance) and which lie on a path to the explained output."""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch

from ..rules.table import lookup
from .nodes import FLOAT, INDEX, OTHER, NodeAnn, is_float_value, module_path, tensor_slots

__all__ = ["mark_data"]

if TYPE_CHECKING:
    from .pipeline import CompileContext


def _has_float_out(node: torch.fx.Node) -> bool:
    v = node.meta.get("val")
    if isinstance(v, (tuple, list)):
        return any(is_float_value(x) for x in v)
    return is_float_value(v)


def _status(node: torch.fx.Node) -> str | None:
    ann = node.meta.get("dynlrp")
    return ann.status if ann is not None else None


def mark_data(gm: torch.fx.GraphModule, ctx: CompileContext) -> torch.fx.GraphModule:
    """Annotate data-ness (see :mod:`.nodes`) and which nodes lie on a path to the explained output.

    The explained inputs are ``ctx.traced.user_inputs`` (float ones carry relevance, integer ones are token ids that
    may reach an embedding); the explained outputs are the graph outputs at ``ctx.traced.output_indices`` (the
    graph's output node lists mutation outputs, new buffer values and mutated inputs, before the user outputs).
    """
    traced = ctx.traced
    float_inputs = {u.placeholder for u in traced.user_inputs if u.is_float}
    index_inputs = {u.placeholder for u in traced.user_inputs if not u.is_float}
    graph_outs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    output_nodes = [graph_outs[i] for i in (traced.output_indices or [traced.output_index])]
    for node in gm.graph.nodes:
        node.meta.pop("dynlrp", None)
        if node.op == "placeholder":
            if node.name in float_inputs:
                node.meta["dynlrp"] = NodeAnn(FLOAT)
            elif node.name in index_inputs:
                node.meta["dynlrp"] = NodeAnn(INDEX)
            continue
        if node.op != "call_function":
            continue
        deps = tensor_slots(node)
        statuses = [(s, a, _status(a)) for s, a in deps]
        if not any(st for _, _, st in statuses):
            continue
        if node.target is operator.getitem:
            parent = node.args[0]
            st = _status(parent)
            v = node.meta.get("val")
            status = OTHER
            if st == FLOAT and is_float_value(v):
                status = FLOAT
            elif st == INDEX and isinstance(v, torch.Tensor) and not is_float_value(v):
                status = INDEX
            node.meta["dynlrp"] = NodeAnn(status, module_path=module_path(node))
            continue
        spec = lookup(node.target)
        allowed = spec.slots if spec is not None else None
        float_slots = [s for s, a, st in statuses if st == FLOAT and (allowed is None or s[0] in allowed or s[0] == "kw")]
        index_slots = [s for s, a, st in statuses if st == INDEX and (allowed is None or s[0] in allowed)]
        has_float_out = _has_float_out(node)
        if any(st == FLOAT for _, _, st in statuses):
            status = FLOAT if has_float_out else OTHER
            slots = float_slots
        elif index_slots and spec is not None and spec.kind == "embedding":
            status, slots = FLOAT, index_slots
        elif index_slots and spec is not None and spec.kind == "route" and not has_float_out:
            status, slots = INDEX, index_slots
        else:
            status, slots = OTHER, []
        ann = NodeAnn(status, slots=slots, module_path=module_path(node))
        if spec is not None:
            ann.factors = [s for s in slots if s[0] in spec.factors]
        node.meta["dynlrp"] = ann
    # relevance can only reach ancestors of the explained outputs
    stack = list(output_nodes)
    seen = set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        ann = n.meta.get("dynlrp")
        if ann is not None and ann.status in (FLOAT, INDEX):
            ann.relevant = True
            if n.target is operator.getitem:
                stack.append(n.args[0])
            else:
                stack.extend(a for s, a in tensor_slots(n) if s in ann.slots)
    return gm

