"""Pullbacks that do not read the forward input: ``convolution_backward`` for the input only -> transposed conv.

LRP rules pull relevance back through a convolution with its VJP. Traced, that is
``convolution_backward(grad, x, W, ..., output_mask=[True, False, False])``: the input gradient, which is the
transposed convolution of ``grad`` with ``W`` and depends on ``x`` only through its *shape*. Yet ``x`` is an
operand, so it must be materialised and alive during the pullback: in ``R_in = x * W^T (R / stab(z))`` the
rule's ``x`` (a recomputed ``relu(z_prev)`` under the ``recompute`` policy) would otherwise be computed only for
the final product, and a compiler could fuse it into that product instead of writing it to memory.
:func:`transpose_convolution_pullbacks` rewrites such calls into ``convolution(grad, W, transposed=True,
output_padding=...)`` (what Zennit calls, ``conv_transpose``), with the output padding that restores ``x``'s
spatial size. Only calls with static spatial sizes are rewritten; the batch may stay symbolic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from .nodes import reads_only_first_output, replace_first_output

__all__ = ["transpose_convolution_pullbacks"]

if TYPE_CHECKING:
    from .pipeline import CompileContext

_aten = torch.ops.aten


def _output_padding(x_size, g_size, w_size, stride, padding, dilation) -> list[int] | None:
    """Output padding of the transposed convolution that maps ``g_size`` back to ``x_size`` (``None``: none does)."""
    pads = []
    for i, (xs, gs, k) in enumerate(zip(x_size, g_size, w_size)):
        s, p, d = stride[i % len(stride)], padding[i % len(padding)], dilation[i % len(dilation)]
        op = xs - ((gs - 1) * s - 2 * p + d * (k - 1) + 1)
        if op < 0 or op >= max(s, d):
            return None
        pads.append(op)
    return pads


def transpose_convolution_pullbacks(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Rewrite input-only ``convolution_backward`` calls into transposed convolutions (see module doc); returns ``gm``."""
    del ctx  # reads nothing from the context
    g = gm.graph
    for n in list(g.nodes):
        if n.op != "call_function" or n.target is not _aten.convolution_backward.default:
            continue
        grad, x, w, _bias_sizes, stride, padding, dilation, transposed, _out_pad, groups, mask = n.args
        if transposed or list(mask) != [True, False, False]:
            continue
        # only the input gradient is read (unread getitems of the other outputs may still be there before DCE)
        if not reads_only_first_output(n):
            continue
        gv, xv, wv = (a.meta.get("val") for a in (grad, x, w))
        if not all(isinstance(v, torch.Tensor) for v in (gv, xv, wv)):
            continue
        ndim = xv.ndim - 2
        sizes = (list(xv.shape[2:]), list(gv.shape[2:]), list(wv.shape[2:]))
        if not all(type(s) is int for part in sizes for s in part):  # a symbolic spatial size: leave it
            continue
        out_pad = _output_padding(*sizes, list(stride), list(padding), list(dilation))
        if out_pad is None or len(out_pad) != ndim:
            continue
        args = (grad, w, None, list(stride), list(padding), list(dilation), True, out_pad, groups)
        fake_mode = detect_fake_mode([gv, wv])
        with fake_mode:
            val = _aten.convolution.default(gv, wv, None, *args[3:])
        if [str(s) for s in val.shape] != [str(s) for s in xv.shape]:
            continue
        with g.inserting_before(n):
            new = g.call_function(_aten.convolution.default, args)
        new.meta["val"] = val
        replace_first_output(g, n, new)
    gm.recompile()
    return gm
