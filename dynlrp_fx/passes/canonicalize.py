"""Canonicalisation: rewrite ``aten.view`` / ``aten._unsafe_view`` to ``aten.reshape``.

A ``view`` holds only for inputs whose strides allow it, and the strides a graph sees at run time are not those it
was traced with: a ``channels_last`` or otherwise strided input (or weight) reaches a flatten whose input is no
longer contiguous, and ``view`` raises "view size is not compatible". Retracing the VJP of such a view fails too
(``docs/design.md``, section 2, "Tracing"). ``reshape`` has the same values for any strides, returns the same view
when one exists (so a contiguous call pays nothing) and copies only when it must. :func:`canonicalize` rewrites the
traced graph; :func:`views_to_reshape` is the same rewrite, used by ``lower`` on the graph ``make_fx`` records
(``reshape`` is CompositeImplicit, so tracing turns it back into a ``view`` fitted to the fake inputs' strides).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .pipeline import CompileContext

__all__ = ["canonicalize", "views_to_reshape"]

_VIEWS = {torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default}


def views_to_reshape(gm: torch.fx.GraphModule) -> int:
    """Rewrite every ``aten.view`` / ``aten._unsafe_view`` node of ``gm`` to ``aten.reshape`` in place (values and
    fake values unchanged; the caller recompiles). Returns the number of nodes rewritten."""
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _VIEWS:
            node.target = torch.ops.aten.reshape.default
            count += 1
    return count


def canonicalize(gm: torch.fx.GraphModule, ctx: CompileContext) -> torch.fx.GraphModule:
    """Rewrite view-like ops to ``reshape`` in place; returns ``gm``."""
    del ctx  # reads nothing from the context
    views_to_reshape(gm)
    gm.recompile()
    return gm
