"""ReLU pullbacks masked by the ReLU's input: ``threshold_backward(g, relu(z), 0)`` -> ``threshold_backward(g, z, 0)``.

A ReLU's gradient-form rule is the op's own VJP, which autograd writes as ``threshold_backward(g, y, 0)`` on the
output ``y = relu(z)``: ``g`` where ``y > 0``, else 0. Under the ``recompute`` memory policy ``y`` is rematerialised
from the held ``z`` (a convolution's or batch norm's output, which the stabiliser of the layer before reads too) for
that mask alone: one activation-sized pass and one activation-sized temporary per ReLU (ResNet-50: 49 per
explanation). ``relu(z) > 0`` exactly where ``z > 0`` (a NaN compares false either way), so the mask is read from
``z`` itself and ``y``, now unread, is dropped by dead-code elimination. Rewritten only where the mask is ``y``'s
only reader: ``z`` is alive where ``y`` is made (``y`` reads it), so ``z`` at most takes over ``y``'s lifetime up
to the mask and the peak cannot rise; a forward ReLU, which feeds the next layer, keeps its mask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx

__all__ = ["mask_relu_pullbacks"]

if TYPE_CHECKING:
    from .pipeline import CompileContext

_aten = torch.ops.aten


def mask_relu_pullbacks(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Read the mask of ``threshold_backward(g, relu(z), 0)`` from ``z`` where ``relu(z)`` is made for that mask
    alone (see module doc); returns ``gm``."""
    del ctx  # reads nothing from the context
    changed = False
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not _aten.threshold_backward.default or n.args[2] != 0:
            continue
        y = n.args[1]
        if not (isinstance(y, fx.Node) and y.target is _aten.relu.default and isinstance(y.args[0], fx.Node)):
            continue
        z = y.args[0]
        zv, yv = z.meta.get("val"), y.meta.get("val")
        if not (isinstance(zv, torch.Tensor) and isinstance(yv, torch.Tensor) and zv.dtype == yv.dtype
                and tuple(zv.shape) == tuple(yv.shape)):
            continue
        if set(y.users) != {n}:
            continue  # y is made for other readers too (a forward ReLU feeds the next layer): nothing to save
        n.replace_input_with(y, z)
        changed = True
    if changed:
        gm.recompile()
    return gm
