"""A sum of ``select_backward`` s that fills every index of one dim is a ``stack``.

A packed projection split with ``select`` (``nn.MultiheadAttention``'s ``in_proj`` unpacked into query, key and
value) gets its cotangent from the three selects' VJPs: each ``select_backward(g_i, sizes, dim, i)`` is a zero
tensor of the packed size with ``g_i`` written at index ``i``, and the three are added. Per layer that is three
zero fills, three copies and two additions over the packed size (ViT-B/16: eight passes over ``(3, 197, B,
768)``). Where the selected indices cover the dim exactly once, the sum is ``stack([g_0, g_1, ...], dim)``: one
pass. The values are the same (zeros added to each element; a ``-0.0`` stays ``-0.0`` instead of becoming
``+0.0``). A partial cover (CP-LRP sends nothing through query and key) is left to
:mod:`~dynlrp_fx.passes.narrow_block_matmuls`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

__all__ = ["stack_select_pullbacks"]

if TYPE_CHECKING:
    from .pipeline import CompileContext

_aten = torch.ops.aten


def _is_plain_add(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target is _aten.add.Tensor and len(n.args) == 2
            and n.kwargs.get("alpha", 1) == 1 and all(isinstance(a, fx.Node) for a in n.args))


def _summands(n: fx.Node, root: fx.Node, inner: list) -> list[fx.Node]:
    """The terms of the tree of plain adds under ``root`` whose inner adds are read by the tree alone (those adds
    are appended to ``inner``)."""
    if _is_plain_add(n) and (n is root or len(n.users) == 1):
        inner.append(n)
        return [t for a in n.args for t in _summands(a, root, inner)]
    return [n]


def stack_select_pullbacks(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Rewrite sums of ``select_backward`` s that cover a dim into one ``stack`` (see module doc); returns ``gm``."""
    del ctx  # reads nothing from the context
    g = gm.graph
    done: set[fx.Node] = set()
    changed = False
    for root in reversed(list(g.nodes)):
        if root in done or not _is_plain_add(root):
            continue
        inner: list[fx.Node] = []
        terms = _summands(root, root, inner)
        if not all(t.target is _aten.select_backward.default and len(t.users) == 1 for t in terms):
            continue
        sizes, dim = list(terms[0].args[1]), terms[0].args[2]
        if any(list(t.args[1]) != sizes or t.args[2] != dim for t in terms):
            continue
        dim %= len(sizes)
        width = sizes[dim]
        if not (isinstance(width, int) and len(terms) == width and all(isinstance(t.args[3], int) for t in terms)):
            continue
        by_index = {t.args[3] % width: t for t in terms}
        if set(by_index) != set(range(width)):
            continue
        parts = [by_index[i].args[0] for i in range(width)]
        vals = [p.meta.get("val") for p in parts]
        if not all(isinstance(v, torch.Tensor) for v in vals):
            continue
        with detect_fake_mode(vals) or contextlib.nullcontext():
            val = _aten.stack.default(vals, dim)
        with g.inserting_before(root):
            st = g.call_function(_aten.stack.default, (parts, dim))
        st.meta = {**root.meta, "val": val}
        root.replace_all_uses_with(st)
        done.update(inner)
        changed = True
    if changed:  # (the selects' VJPs and the adds, now unread, go with eliminate_dead_code)
        gm.recompile()
    return gm
