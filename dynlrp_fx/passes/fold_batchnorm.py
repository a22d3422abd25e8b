"""Canonicalisation: fold eval-mode batch norm into the preceding convolution or linear op.

Zennit's ``MergeBatchNorm`` canonizer, done generically on the graph: wherever the output of ``convolution``
(``addmm`` / ``mm`` for ``nn.Linear``) feeds only an ``_native_batch_norm_legit_no_training`` whose
result is used through ``getitem(., 0)`` alone, the pair becomes one op with

    W' = W * s (per output channel),   b' = (b - running_mean) * s + beta,   s = gamma / sqrt(running_var + eps)

so that weight-modifying rules (gamma, z+, alpha-beta, z^B) see the merged weights, as Zennit users expect. The
folded parameters are computed *inside the graph* from the parameter and buffer placeholders (new ops inserted
before the convolution), so they follow the live parameters at every call and the user's model is never modified.
The forward value is unchanged up to rounding. Batch norms that do not directly follow such an op (or whose input
is also used elsewhere) are left alone.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

if TYPE_CHECKING:
    from .pipeline import CompileContext

__all__ = ["fold_batchnorm"]

aten = torch.ops.aten
_BN = aten._native_batch_norm_legit_no_training.default
_CONV = (aten.convolution.default,)
_LINEAR = (aten.addmm.default, aten.mm.default)


def _depends_on(node: fx.Node, inputs: set[str], memo: dict) -> bool:
    if node in memo:
        return memo[node]
    if node.op == "placeholder":
        res = node.name in inputs
    else:
        res = any(_depends_on(a, inputs, memo) for a in node.all_input_nodes)
    memo[node] = res
    return res


def fold_batchnorm(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Fold every foldable eval-mode batch norm into its producer (see module doc); returns ``gm``.

    The weight operand must not depend on a model input: the placeholders of ``ctx.traced.user_inputs`` (without a
    trace: every placeholder whose name does not start with ``p_``/``b_``/``c_``, the export naming of parameters,
    buffers and constants).
    """
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    user_inputs = {u.placeholder for u in ctx.traced.user_inputs} if ctx.traced is not None else None
    if user_inputs is None:
        user_inputs = {n.name for n in placeholders if not n.name.startswith(("p_", "b_", "c_"))}
    fake_mode = torch._guards.detect_fake_mode([n.meta["val"] for n in placeholders if "val" in n.meta])
    memo: dict = {}
    changed = False
    for bn in list(graph.nodes):
        if bn.op != "call_function" or bn.target is not _BN:
            continue
        prod = bn.args[0]
        if not isinstance(prod, fx.Node) or prod.op != "call_function" or len(prod.users) != 1:
            continue
        users = list(bn.users)
        if not users or any(u.target is not operator.getitem or u.args[1] != 0 for u in users):
            continue
        if prod.target in _CONV:
            x, w, b = prod.args[0], prod.args[1], prod.args[2]
            transposed, groups = bool(prod.args[6]), int(prod.args[8])
            if transposed and groups != 1:
                continue
            w_dim = 1 if transposed else 0
        elif prod.target in _LINEAR:
            if prod.target is aten.addmm.default:
                b, x, w = prod.args[0], prod.args[1], prod.args[2]
                if prod.kwargs.get("beta", 1) != 1 or prod.kwargs.get("alpha", 1) != 1:
                    continue
            else:
                b, (x, w) = None, prod.args[:2]
            w_dim = 1  # (in, out) operand: output features along dim 1
            if b is not None and getattr(b.meta.get("val"), "ndim", 0) != 1:
                continue
        else:
            continue
        if not isinstance(w, fx.Node) or _depends_on(w, user_inputs, memo):
            continue
        if isinstance(b, fx.Node) and _depends_on(b, user_inputs, memo):
            continue
        bn_w, bn_b, mean, var = bn.args[1:5]
        order = {n: i for i, n in enumerate(graph.nodes)}
        if any(isinstance(a, fx.Node) and order[a] > order[prod] for a in (bn_w, bn_b, mean, var)):
            continue  # statistics computed after the producer: cannot insert the fold before it
        eps = float(bn.args[6])
        wval = w.meta.get("val")
        if wval is None:
            continue

        def emit(target, *args, _meta=prod.meta):
            node = graph.call_function(target, tuple(args))
            for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
                if key in _meta:
                    node.meta[key] = _meta[key]
            fargs = [a.meta["val"] if isinstance(a, fx.Node) else a for a in args]
            with fake_mode:
                node.meta["val"] = target(*fargs)
            return node

        with graph.inserting_before(prod):
            inv = emit(aten.rsqrt.default, emit(aten.add.Tensor, var, eps))
            scale = emit(aten.mul.Tensor, bn_w, inv) if bn_w is not None else inv
            shape = [1] * wval.ndim
            shape[w_dim] = -1
            new_w = emit(aten.mul.Tensor, w, emit(aten.reshape.default, scale, shape))
            shift = emit(aten.sub.Tensor, b, mean) if b is not None else emit(aten.neg.default, mean)
            new_b = emit(aten.mul.Tensor, shift, scale)
            if bn_b is not None:
                new_b = emit(aten.add.Tensor, new_b, bn_b)
        if prod.target in _CONV:
            args = list(prod.args)
            args[1], args[2] = new_w, new_b
            prod.args = tuple(args)
        elif prod.target is aten.addmm.default:
            prod.args = (new_b, x, new_w)
        else:
            prod.target = aten.addmm.default
            prod.args = (new_b, x, new_w)
        for u in users:
            u.replace_all_uses_with(prod)
            graph.erase_node(u)
        graph.erase_node(bn)
        changed = True
    if changed:
        graph.lint()
        gm.recompile()
    return gm
