"""Canonicalisation: rewrite ``aten.view`` / ``aten._unsafe_view`` to ``aten.reshape``.

Retracing the VJP of a view whose input has other strides fails (``docs/design.md``, section 2, "Tracing");
``reshape`` has the same values and copies only when it must.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .pipeline import CompileContext

__all__ = ["canonicalize"]

_VIEWS = {torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default}


def canonicalize(gm: torch.fx.GraphModule, ctx: CompileContext) -> torch.fx.GraphModule:
    """Rewrite view-like ops to ``reshape`` in place; returns ``gm``."""
    del ctx  # reads nothing from the context
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _VIEWS:
            node.target = torch.ops.aten.reshape.default
    gm.recompile()
    return gm
