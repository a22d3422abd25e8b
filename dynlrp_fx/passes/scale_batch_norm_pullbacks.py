"""Pullbacks of inference batch norm as a per-channel scale: ``native_batch_norm_backward`` in eval mode -> ``mul``.

A rule's VJP through an inference batch norm (``_native_batch_norm_legit_no_training``) traces to
``native_batch_norm_backward(grad, x, weight, running_mean, running_var, save_mean, save_invstd, train=False, eps,
[True, False, False])``. In eval mode its input gradient is ``grad * weight / sqrt(running_var + eps)`` per
channel, yet the call reads ``x`` and the saved statistics, which are outputs of the forward op: under the
``recompute`` memory policy the whole batch norm is recomputed for them (one activation-sized pass per layer, on
ResNet-50 53 of them) and the backward kernel reads ``x`` once more. :func:`scale_batch_norm_pullbacks` rewrites such
calls into ``grad * scale`` with the per-channel ``scale`` computed from the parameters; the forward recompute then
has no user and dead-code elimination drops it. Only calls whose input gradient alone is read are rewritten.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from .nodes import reads_only_first_output, replace_first_output

__all__ = ["scale_batch_norm_pullbacks"]

if TYPE_CHECKING:
    from .pipeline import CompileContext

_aten = torch.ops.aten


def scale_batch_norm_pullbacks(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Rewrite eval-mode, input-only ``native_batch_norm_backward`` calls into a per-channel ``mul`` (see module
    doc); returns ``gm``."""
    del ctx  # reads nothing from the context
    g = gm.graph
    for n in list(g.nodes):
        if n.op != "call_function" or n.target is not _aten.native_batch_norm_backward.default:
            continue
        grad, x, weight, _mean, var, _save_mean, _save_invstd, train, eps, mask = n.args
        if train or var is None or not mask[0]:
            continue
        # only the input gradient is read (unread getitems of the other outputs may still be there before DCE)
        if not reads_only_first_output(n):
            continue
        gv, xv, vv = (a.meta.get("val") for a in (grad, x, var))
        wv = weight.meta.get("val") if weight is not None else None
        if not all(isinstance(v, torch.Tensor) for v in (gv, xv, vv)) or (weight is not None and wv is None):
            continue
        if gv.dtype != xv.dtype or vv.ndim != 1 or xv.ndim < 2:
            continue
        # scale = weight * rsqrt(running_var + eps), shaped (C, 1, ..., 1) against the channels in dim 1
        calls = [(_aten.add.Tensor, (var, eps), {}), (_aten.rsqrt.default, (), {})]
        if weight is not None:
            calls.append((_aten.mul.Tensor, (weight,), {}))
        calls.append((_aten.reshape.default, ([-1] + [1] * (xv.ndim - 2),), {}))
        if vv.dtype != gv.dtype:
            calls.append((_aten._to_copy.default, (), {"dtype": gv.dtype}))
        calls.append((_aten.mul.Tensor, (grad,), {}))
        with g.inserting_before(n), detect_fake_mode([gv, xv, vv]) or contextlib.nullcontext():
            cur = None
            for op, rest, kwargs in calls:
                args = rest if cur is None else (cur, *rest)
                cur = g.call_function(op, args, kwargs)
                cur.meta["val"] = op(*(a.meta["val"] if isinstance(a, fx.Node) else a for a in args), **kwargs)
        replace_first_output(g, n, cur)
    gm.recompile()
    return gm

