"""Promise resolution: bind every promise node to the forward value it names.

DynamicLRP recovers forward values that autograd did not save at run time ("promises"). Here the complete
forward graph is available, so a promise is a node of the relevance half naming a forward value, and this pass
binds it at compile time. The ``keep`` policy binds each promise to the forward value itself (kept alive until
its relevance op runs); rematerialisation of cheap values is left to the compiler (Inductor's fusion recomputes
pointwise chains) and to the performance policy of the benchmarks issue.
"""

from __future__ import annotations

import torch.fx as fx

from .pair import promise

__all__ = ["resolve_promises", "count_promises"]

POLICIES = ("keep",)


def count_promises(gm: fx.GraphModule) -> int:
    """Number of unresolved promise nodes."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is promise)


def resolve_promises(gm: fx.GraphModule, policy: str = "keep") -> fx.GraphModule:
    """Replace every promise node by the forward value it names; returns ``gm``."""
    if policy not in POLICIES:
        raise ValueError(f"unknown promise policy {policy!r}; expected one of {POLICIES}")
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is promise:
            node.replace_all_uses_with(node.meta["promise_of"])
            gm.graph.erase_node(node)
    gm.recompile()
    return gm
