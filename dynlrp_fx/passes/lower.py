"""Lowering: retrace the paired graph with ``make_fx`` into a graph of ATen ops only.

Rules call Python helpers and ``torch.func.vjp``; tracing them with ``make_fx`` over the exported program's fake
tensors (whose batch size is a symbol) records the ATen ops they run, including PyTorch's derivative formulas,
and keeps the batch dimension symbolic. The result has no Python rule code left: it is what ``torch.compile``
fuses and what ``torch.export`` saves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

__all__ = ["lower"]

if TYPE_CHECKING:
    from .pipeline import CompileContext


def lower(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Trace ``gm`` on the fake values of its placeholders (the exported program's fake mode, with a symbolic
    batch) into a pure ATen graph."""
    del ctx  # reads nothing from the context
    fake_args = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        lowered = make_fx(gm, tracing_mode="symbolic", _allow_non_fake_inputs=False)(*fake_args)
    return lowered
