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

__all__ = ["fold_batchnorm", "foldable_pair", "merge_batchnorm_rules", "model_input_names"]

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


def model_input_names(graph: fx.Graph, ctx: CompileContext) -> set[str]:
    """Placeholder names of the model's inputs: those of ``ctx.traced.user_inputs``, or without a trace every
    placeholder whose name does not start with ``p_``/``b_``/``c_`` (the export naming of parameters, buffers and
    constants)."""
    if ctx.traced is not None:
        return {u.placeholder for u in ctx.traced.user_inputs}
    return {n.name for n in graph.nodes if n.op == "placeholder" and not n.name.startswith(("p_", "b_", "c_"))}


def foldable_pair(bn: fx.Node, user_inputs: set[str], memo: dict) -> tuple | None:
    """``(producer, x, w, b, w_dim)`` when ``bn`` is an eval-mode batch norm that :func:`fold_batchnorm` folds into
    its producer, else ``None``: the producer is a convolution (not grouped transposed) or ``nn.Linear``'s
    ``addmm`` / ``mm`` used by the batch norm alone, the batch norm is read through ``getitem(., 0)`` alone, the
    weight and bias do not depend on a model input (``user_inputs``: placeholder names; ``memo`` caches that
    search), and the batch norm's parameters come before the producer (the fold is inserted before it).
    ``w_dim`` is the weight's output-feature dim."""
    if bn.op != "call_function" or bn.target is not _BN:
        return None
    prod = bn.args[0]
    if not isinstance(prod, fx.Node) or prod.op != "call_function" or len(prod.users) != 1:
        return None
    users = list(bn.users)
    if not users or any(u.target is not operator.getitem or u.args[1] != 0 for u in users):
        return None
    if prod.target in _CONV:
        x, w, b = prod.args[0], prod.args[1], prod.args[2]
        transposed, groups = bool(prod.args[6]), int(prod.args[8])
        if transposed and groups != 1:
            return None
        w_dim = 1 if transposed else 0
    elif prod.target in _LINEAR:
        if prod.target is aten.addmm.default:
            b, x, w = prod.args[0], prod.args[1], prod.args[2]
            if prod.kwargs.get("beta", 1) != 1 or prod.kwargs.get("alpha", 1) != 1:
                return None
        else:
            b, (x, w) = None, prod.args[:2]
        w_dim = 1  # (in, out) operand: output features along dim 1
        if b is not None and getattr(b.meta.get("val"), "ndim", 0) != 1:
            return None
    else:
        return None
    if not isinstance(w, fx.Node) or _depends_on(w, user_inputs, memo) or w.meta.get("val") is None:
        return None
    if isinstance(b, fx.Node) and _depends_on(b, user_inputs, memo):
        return None
    order = {n: i for i, n in enumerate(prod.graph.nodes)}
    if any(isinstance(a, fx.Node) and order[a] > order[prod] for a in bn.args[1:5]):
        return None  # statistics computed after the producer: cannot insert the fold before it
    return prod, x, w, b, w_dim


def fold_batchnorm(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Fold every foldable eval-mode batch norm into its producer (see module doc); returns ``gm``.

    The weight operand must not depend on a model input: the placeholders of ``ctx.traced.user_inputs`` (without a
    trace: every placeholder whose name does not start with ``p_``/``b_``/``c_``, the export naming of parameters,
    buffers and constants).
    """
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    user_inputs = model_input_names(graph, ctx)
    fake_mode = torch._guards.detect_fake_mode([n.meta["val"] for n in placeholders if "val" in n.meta])
    memo: dict = {}
    changed = False
    for bn in list(graph.nodes):
        pair = foldable_pair(bn, user_inputs, memo)
        if pair is None:
            continue
        prod, x, w, b, w_dim = pair
        users = list(bn.users)
        bn_w, bn_b, mean, var = bn.args[1:5]
        eps = float(bn.args[6])
        wval = w.meta["val"]

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


def merge_batchnorm_rules(gm: fx.GraphModule, ctx: CompileContext) -> int:
    """The ``merge_batchnorm`` canonizer (run by ``assign_rules`` once every node has its rule); returns how many
    pairs it merged.

    Folding a batch norm into its producer (:func:`fold_batchnorm`) gives the epsilon rule one stabiliser, at the
    merged output ``y = s * (W x + b - mean) + beta``. Without touching the weights the same relevance comes from
    LRP-0 at the producer and the producer's epsilon rule at the batch norm: the batch norm sends ``s * R /
    stab(y)`` per channel to ``z = W x + b``, and LRP-0 there gives ``x * W^T (R_z / z) = x * W^T (s * R /
    stab(y))``, the merged layer's relevance; the producer's bias and the shift are absorbed at their own ops, in
    the same total. So for every pair that :func:`fold_batchnorm` would fold and where both ops have the plain
    :class:`~dynlrp_fx.rules.Epsilon` rule, the batch norm takes the producer's rule and the producer gets
    ``Epsilon(0)``: one stabiliser per pair instead of two, and no per-call weight product (a rule that modifies
    weights, gamma or z+, needs the folded weights: ``fold_batchnorm``)."""
    from ..rules.core import Epsilon

    user_inputs = model_input_names(gm.graph, ctx)
    memo: dict = {}
    merged = 0
    for bn in gm.graph.nodes:
        pair = foldable_pair(bn, user_inputs, memo)
        if pair is None:
            continue
        p_ann, b_ann = pair[0].meta.get("dynlrp"), bn.meta.get("dynlrp")
        if p_ann is None or b_ann is None or type(p_ann.rule) is not Epsilon or type(b_ann.rule) is not Epsilon:
            continue
        if p_ann.rule.epsilon == 0 and b_ann.rule.epsilon == 0:
            continue  # LRP-0 on both: nothing to merge
        b_ann.rule, p_ann.rule = p_ann.rule, Epsilon(0.0)
        merged += 1
    return merged
