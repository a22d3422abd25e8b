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

A patch embedding (stride equal to a kernel of at least 16 taps, no padding, dilation or groups: ViT's 16x16,
ConvNeXt's and Swin's 4x4 stems) has non-overlapping windows, so its pullback is one matrix product, ``g`` as
``(B * patches, C_out)`` times ``W`` as ``(C_out, C_in * taps)``, with the patches laid back in place by a
permute (and zero rows / columns where the windows did not reach the input's edge). On this CPU that took 1.9 ms
against the transposed convolution's 11.8 ms for ViT-B/16 at 224x224, batch 1 (10.8 ms against 60 ms at batch 8;
gradient x input's own ``convolution_backward`` 10.8 / 58 ms); with 4 taps (2x2 stride-2 downsampling) it was
not faster, so those stay transposed convolutions.
"""

from __future__ import annotations

import math
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


def _is_patch_embedding(kernel, stride, padding, dilation, groups) -> bool:
    """Non-overlapping windows of at least 16 taps that tile the input from its corner (see module doc)."""
    return (groups == 1 and math.prod(kernel) >= 16 and list(stride) == list(kernel)
            and all(p == 0 for p in padding) and all(d == 1 for d in dilation))


def _patch_pullback(g: fx.Graph, before: fx.Node, grad: fx.Node, w: fx.Node, gv, wv, xv, fake_mode) -> fx.Node:
    """The input gradient of a patch embedding as one ``mm`` (see module doc), inserted before ``before``: ``grad``
    ``(B, C_out, *P)`` -> ``(B * prod(P), C_out) @ (C_out, C_in * prod(K))`` -> ``(B, C_in, *(P * K))``, padded
    with zeros to ``xv``'s spatial size."""
    n = gv.ndim - 2
    c_out, c_in, kernel = wv.shape[0], wv.shape[1], list(wv.shape[2:])
    patches, spatial = list(gv.shape[2:]), list(xv.shape[2:])
    pad: list[int] = []
    for p, k, x in reversed(list(zip(patches, kernel, spatial))):  # constant_pad_nd lists the last dim first
        pad += [0, x - p * k]
    with g.inserting_before(before):
        batch = g.call_function(_aten.sym_size.int, (grad, 0))  # B, read from grad at run time
        batch.meta["val"] = b = gv.shape[0]
        w2 = g.call_function(_aten.reshape.default, (w, [c_out, c_in * math.prod(kernel)]))
        with fake_mode:
            w2.meta["val"] = wv.reshape(c_out, c_in * math.prod(kernel))
        cur, val = grad, gv

        def step(op, *rest, fake: tuple | None = None) -> None:
            """Append ``op(cur, *rest)`` and make it ``cur``; ``fake``: the arguments after the tensor for its fake
            value, where they hold nodes (the weight, ``B``)."""
            nonlocal cur, val
            cur = g.call_function(op, (cur, *rest))
            with fake_mode:
                val = op(val, *(rest if fake is None else fake))
            cur.meta["val"] = val

        step(_aten.permute.default, [0, *range(2, n + 2), 1])
        step(_aten.reshape.default, [-1, c_out])
        step(_aten.mm.default, w2, fake=(w2.meta["val"],))
        step(_aten.reshape.default, [batch, *patches, c_in, *kernel], fake=([b, *patches, c_in, *kernel],))
        step(_aten.permute.default, [0, n + 1, *[i for d in range(n) for i in (1 + d, n + 2 + d)]])
        out = [c_in, *[p * k for p, k in zip(patches, kernel)]]
        step(_aten.reshape.default, [batch, *out], fake=([b, *out],))
        if any(pad):
            step(_aten.constant_pad_nd.default, pad, 0.0)
    return cur


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
        fake_mode = detect_fake_mode([gv, wv])
        if _is_patch_embedding(sizes[2], stride, padding, dilation, groups):
            replace_first_output(g, n, _patch_pullback(g, n, grad, w, gv, wv, xv, fake_mode))
            continue
        args = (grad, w, None, list(stride), list(padding), list(dilation), True, out_pad, groups)
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
