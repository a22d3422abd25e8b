"""Scheduling: compute cheap values just before they are needed.

Lowering emits a rule's ops in the order the rule's Python code runs, and the ``recompute`` memory policy puts a
rematerialised activation before the whole rule that reads it. In ``R_in = x * W^T (R / stab(z))`` the recomputed
``x = relu(z_prev)`` is then alive during the stabiliser and the pullback, one activation more than needed.
:func:`sink_cheap_ops` moves every cheap (pointwise or view) op down to just before its first user when that cannot
make anything live longer: each tensor it reads is an input of the graph or is read again at or after the new
position. The op's own output is then allocated later and nothing else changes (values are bit-identical; only
the order of independent ops moves).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from .nodes import is_cheap, tensor_inputs

__all__ = ["sink_cheap_ops"]

if TYPE_CHECKING:
    from .pipeline import CompileContext

MAX_ROUNDS = 4  #: sweeps of sink_cheap_ops (a chain of cheap ops moves one op per sweep)


def sink_cheap_ops(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Move cheap ops to just before their first user where no lifetime grows (see module doc); returns ``gm``.

    Runs to a fixed point (at most :data:`MAX_ROUNDS` sweeps), so a chain of cheap ops (batch norm -> getitem -> relu)
    moves down together.
    """
    del ctx  # reads nothing from the context
    g = gm.graph
    # in-place ops (a VJP's index_put_ into zeros): nothing moves past one, it might change what the op reads
    writers = [
        n for n in g.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
    ]
    for _ in range(MAX_ROUNDS):
        order = {n: i for i, n in enumerate(g.nodes)}
        # the last position at which each value is read
        last_read: dict[fx.Node, float] = {}
        for n in g.nodes:
            for a in n.all_input_nodes:
                last_read[a] = order[n]
        moved = False
        for n in reversed(list(g.nodes)):
            if n.op != "call_function" or not n.users or not is_cheap(n):
                continue
            first = min(n.users, key=order.__getitem__)
            j = order[first]
            if j <= order[n] + 1 or any(order[n] < order[w] < j for w in writers):
                continue
            if not all(u.op in ("placeholder", "get_attr") or last_read.get(u, -1) >= j for u in tensor_inputs(n)):
                continue
            first.prepend(n)
            order[n] = (order[n.prev] + j) / 2  # between its new neighbours
            for u in n.all_input_nodes:
                last_read[u] = max(last_read[u], order[n])
            moved = True
        if not moved:
            break
    gm.recompile()
    return gm

