"""Reshapes read their operand directly: ``reshape(clone(x, contiguous), s)`` -> ``reshape(x, s)``.

``make_fx`` traces ``reshape`` of a value it cannot prove viewable for every size (a permuted ``(B, H, L, D)``
merged to ``(B*H, L, D)`` for a ``bmm``, with ``B`` symbolic) as ``clone(x, memory_format=contiguous_format)``
followed by ``_unsafe_view``: a copy on every call. ``reshape`` run eagerly copies only where the strides it is given
need it, so reading ``x`` directly costs nothing where the view exists (``B = 1`` merges any strides into ``B*H``)
and one copy where it does not, and the copy a ``reshape`` of a permuted value already made (the head merge
``reshape(permute(o), (B, L, H*D))`` before a projection) is no longer copied a second time. Values are unchanged;
the result may now alias ``x``, which later passes see (``reshape`` returns an alias in the op table, so
:func:`~dynlrp_fx.passes.reuse_buffers.reuse_buffers` never writes into it while ``x``'s storage is read later).
Skipped where a graph output could alias through the rewritten reshape: returned tensors keep their own storage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from ..rules.table import returns_alias
from .nodes import RESHAPES, is_recomputed, is_view_of

__all__ = ["elide_reshape_copies"]

if TYPE_CHECKING:
    from .pipeline import CompileContext

_aten = torch.ops.aten


def _reaches_output(n: fx.Node) -> bool:
    """Whether ``n`` or a view of it (through any chain of aliasing ops) is a graph output."""
    todo, seen = [n], set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        for u in m.users:
            if u.op == "output":
                return True
            if is_view_of(u, m):
                todo.append(u)
    return False


def elide_reshape_copies(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Let reshapes of a contiguous clone read the clone's operand (see module doc); returns ``gm``."""
    del ctx  # reads nothing from the context
    changed = False
    for c in list(gm.graph.nodes):
        if c.op != "call_function" or c.target is not _aten.clone.default:
            continue
        if c.kwargs.get("memory_format") is not torch.contiguous_format or not isinstance(c.args[0], fx.Node):
            continue
        users = list(c.users)
        if not users or any(u.op != "call_function" or u.args[0] is not c for u in users):
            continue
        reshapes_only = all(u.target in RESHAPES for u in users)
        views_only = all(isinstance(u.target, torch._ops.OpOverload) and returns_alias(u.target) for u in users)
        if not (reshapes_only or (views_only and is_recomputed(c))):
            continue
        if any(_reaches_output(u) for u in users):
            continue
        x = c.args[0]
        for u in users:
            if u.target in RESHAPES:
                u.target = _aten.reshape.default  # ``view`` / ``_unsafe_view`` of a non-contiguous x would fail
            u.replace_input_with(c, x)
        gm.graph.erase_node(c)
        changed = True
    if changed:
        gm.recompile()
    return gm
