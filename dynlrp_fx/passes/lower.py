"""Lowering: retrace the paired graph with ``make_fx`` into a graph of ATen ops only.

Rules call Python helpers and ``torch.func.vjp``; tracing them with ``make_fx`` over the exported program's fake
tensors (whose batch size is a symbol) records the ATen ops they run, including PyTorch's derivative formulas,
and keeps the batch dimension symbolic. The result has no Python rule code left: it is what ``torch.compile``
fuses and what ``torch.export`` saves.

``make_fx`` decomposes ``reshape`` into ``view`` for the strides of the fake inputs it traces with (contiguous
ones). Those views are rewritten back to ``reshape`` (:func:`~.canonicalize.views_to_reshape`), so that the program,
and the file ``torch.export`` saves from it (export keeps ``reshape``), run on inputs and weights of any strides:
``channels_last``, transposed, sliced or expanded. On a viewable tensor ``reshape`` is that view.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from .canonicalize import views_to_reshape

__all__ = ["lower"]

if TYPE_CHECKING:
    from .pipeline import CompileContext


def lower(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Trace ``gm`` on the fake values of its placeholders (the exported program's fake mode, with a symbolic
    batch) into a pure ATen graph whose reshapes hold for inputs of any strides (see module doc)."""
    del ctx  # reads nothing from the context
    fake_args = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        lowered = make_fx(gm, tracing_mode="symbolic", _allow_non_fake_inputs=False)(*fake_args)
    if views_to_reshape(lowered):
        lowered.recompile()
    return lowered
