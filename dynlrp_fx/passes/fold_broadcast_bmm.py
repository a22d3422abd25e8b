"""Batched matmuls against a broadcast matrix become one matmul: ``bmm(A, expand(W))`` -> ``mm(A.reshape(-1, K), W)``.

``F.linear`` on a 3-d input whose leading dims cannot be merged without a copy (``nn.MultiheadAttention`` projects
a ``transpose(0, 1)`` of a batch-first input: shape ``(L, N, E)``, strides ``(E, L * E, 1)``) is traced by
``torch.export`` through ``matmul``'s decomposition as ``bmm(A, W.expand(L, K, N))``: ``L`` separate products of
``N`` rows each, every one of them reading the whole weight. At batch 1 these are matrix-vector products, one per
sequence position, which make the projections and their relevance pullbacks a large share of an explanation's
time on a CPU (eager ``F.linear`` copies the input and calls one ``addmm``; measurements in
``benchmarks/results/tuning_notes.md``). :func:`fold_broadcast_bmm`
rewrites every ``bmm`` whose second operand is broadcast along the batch dim (stride 0) into
``mm(reshape(A, (-1, K)), W).view(B, M, N)``: the same products, summed in another order (not bit-identical to the
``bmm``; the forward and relevance halves are rewritten alike, so the explanation stays consistent). The
``reshape`` copies only when ``A`` cannot be viewed as a matrix, which is what eager ``F.linear`` does too.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

__all__ = ["fold_broadcast_bmm"]

if TYPE_CHECKING:
    from .pipeline import CompileContext

_aten = torch.ops.aten


def fold_broadcast_bmm(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Rewrite ``bmm(A, B)`` with ``B`` broadcast along its batch dim into one ``mm`` (see module doc); returns ``gm``.

    Only calls whose contraction size ``K`` and output width ``N`` are static, and whose batch or row count is, are
    rewritten (the other one may be symbolic: it is inferred by the final ``view``)."""
    del ctx  # reads nothing from the context
    g = gm.graph
    changed = False
    for n in list(g.nodes):
        if n.op != "call_function" or n.target is not _aten.bmm.default:
            continue
        a, b = n.args
        av, bv, ov = (v.meta.get("val") if isinstance(v, fx.Node) else None for v in (a, b, n))
        if not all(isinstance(v, torch.Tensor) for v in (av, bv, ov)):
            continue
        if type(bv.stride(0)) is not int or bv.stride(0) != 0:  # not broadcast along the batch
            continue
        bs, m, k = av.shape
        n_out = bv.shape[2]
        if type(k) is not int or type(n_out) is not int:
            continue
        if type(m) is int:
            out_shape = [-1, m, n_out]
        elif type(bs) is int:
            out_shape = [bs, -1, n_out]
        else:
            continue
        with detect_fake_mode([av, bv]) or contextlib.nullcontext():
            w_val = _aten.select.int(bv, 0, 0)
            a2_val = _aten.reshape.default(av, [-1, k])
            mm_val = _aten.mm.default(a2_val, w_val)
            out_val = _aten.view.default(mm_val, out_shape)
        if [str(s) for s in out_val.shape] != [str(s) for s in ov.shape]:
            continue
        with g.inserting_before(n):
            w = g.call_function(_aten.select.int, (b, 0, 0))
            a2 = g.call_function(_aten.reshape.default, (a, [-1, k]))
            mm = g.call_function(_aten.mm.default, (a2, w))
            out = g.call_function(_aten.view.default, (mm, out_shape))
        for node, val in ((w, w_val), (a2, a2_val), (mm, mm_val), (out, out_val)):
            node.meta["val"] = val
        n.replace_all_uses_with(out)
        g.erase_node(n)
        changed = True
    if changed:
        gm.recompile()
    return gm
