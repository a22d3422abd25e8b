"""``eliminate_common_subexpressions``: merge repeated pure ATen calls that compute the same value."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..rules.table import facts
from .nodes import is_cheap
from .values import cse_key as _cse_key

__all__ = ["eliminate_common_subexpressions"]

if TYPE_CHECKING:
    from .pipeline import CompileContext



def eliminate_common_subexpressions(gm: torch.fx.GraphModule, ctx: CompileContext) -> torch.fx.GraphModule:
    """Merge repeated pure ATen calls that compute the same value into one; returns ``gm``.

    Rules that pull relevance back through an op with its VJP re-run the op (e.g. max-pooling, for its indices)
    on the very values the forward pass used, and the conservation ledger sums a relevance tensor both as the
    output of one op and as the input of the next. Such repeats are merged. Values are numbered through cheap
    pointwise and view ops without merging those: the ``recompute`` memory policy duplicates them on purpose,
    and an op that reads a recomputed copy is merged with its forward twin only when it is a reduction (whose
    small result costs no memory to keep); a max-pool over a recomputed activation is recomputed too.
    """
    del ctx  # reads nothing from the context
    # values that an in-place op writes to stay distinct (two zeros_like() buffers may be filled differently)
    mutated = {
        a
        for n in gm.graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
        for a in n.all_input_nodes
    }
    canon: dict[torch.fx.Node, torch.fx.Node] = {}  # node -> first node known to compute the same value
    seen: dict[Any, torch.fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node in mutated:
            continue
        key = _cse_key(node, canon)
        if key is None:
            continue
        prev = seen.get(key)
        if prev is None:
            seen[key] = node
            continue
        same_operands = _cse_key(node, {}) == _cse_key(prev, {})
        reduction = facts(node.target).reduction
        if is_cheap(node) or not (same_operands or reduction):
            canon[node] = prev  # the same value, kept as a separate computation
            continue
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm
