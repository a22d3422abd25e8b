"""Analysis passes: data-ness, normaliser detection and rule assignment. Results ride on ``node.meta``.

``node.meta["dynlrp"]`` holds a :class:`NodeAnn` for every node that depends on an explained input:

* ``status``: ``"float"`` (a floating value that depends on a float input or on an embedding lookup of an
  explained integer input), ``"index"`` (an integer value reached from an explained integer input through route
  ops only: token ids and their reshapes), or ``"other"`` (depends on inputs but carries no relevance: masks,
  comparisons, shape values).
* ``slots``: operand slots that receive relevance; ``rule_class`` / ``rule``: set by :func:`assign_rules`.

Only ``float``/``index`` operands are *data*: parameters, buffers, constants and masks derived from integer
inputs are not, so an attention mask never takes a share of relevance.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import DynlrpUnsupportedOpError
from ..rules.base import Rule
from ..rules.composite import Composite, NodeInfo
from ..rules.table import classify, lookup
from .values import value_numbers

__all__ = ["NodeAnn", "mark_data", "detect_normalizers", "assign_rules", "module_path", "tensor_slots"]

FLOAT, INDEX, OTHER = "float", "index", "other"


@dataclass
class NodeAnn:
    status: str
    slots: list = field(default_factory=list)
    rule_class: str | None = None
    rule: Rule | None = None
    factors: list = field(default_factory=list)
    module_path: str = ""
    first_layer: bool = False
    relevant: bool = False
    extra: dict = field(default_factory=dict)


def _is_float_val(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and (v.dtype.is_floating_point or v.dtype.is_complex)


def _has_float_out(node: torch.fx.Node) -> bool:
    v = node.meta.get("val")
    if isinstance(v, (tuple, list)):
        return any(_is_float_val(x) for x in v)
    return _is_float_val(v)


def tensor_slots(node: torch.fx.Node) -> list[tuple[tuple, torch.fx.Node]]:
    """``[(slot, arg node)]`` for every Node operand of ``node`` (``(i,)``, ``(i, j)`` or ``("kw", name)``)."""
    out = []
    for i, a in enumerate(node.args):
        if isinstance(a, torch.fx.Node):
            out.append(((i,), a))
        elif isinstance(a, (list, tuple)):
            for j, b in enumerate(a):
                if isinstance(b, torch.fx.Node):
                    out.append(((i, j), b))
    for k, a in node.kwargs.items():
        if isinstance(a, torch.fx.Node):
            out.append((("kw", k), a))
    return out


def module_path(node: torch.fx.Node) -> str:
    """Innermost module path of a node from ``nn_module_stack`` (``""`` for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else str(path)


def _status(node: torch.fx.Node) -> str | None:
    ann = node.meta.get("dynlrp")
    return ann.status if ann is not None else None


def mark_data(gm: torch.fx.GraphModule, float_inputs: set[str], index_inputs: set[str], output_node: torch.fx.Node) -> torch.fx.GraphModule:
    """Annotate data-ness (see module doc) and which nodes lie on a path to ``output_node``."""
    for node in gm.graph.nodes:
        node.meta.pop("dynlrp", None)
        if node.op == "placeholder":
            if node.name in float_inputs:
                node.meta["dynlrp"] = NodeAnn(FLOAT)
            elif node.name in index_inputs:
                node.meta["dynlrp"] = NodeAnn(INDEX)
            continue
        if node.op != "call_function":
            continue
        deps = tensor_slots(node)
        statuses = [(s, a, _status(a)) for s, a in deps]
        if not any(st for _, _, st in statuses):
            continue
        if node.target is operator.getitem:
            parent = node.args[0]
            st = _status(parent)
            v = node.meta.get("val")
            status = OTHER
            if st == FLOAT and _is_float_val(v):
                status = FLOAT
            elif st == INDEX and isinstance(v, torch.Tensor) and not _is_float_val(v):
                status = INDEX
            node.meta["dynlrp"] = NodeAnn(status, module_path=module_path(node))
            continue
        spec = lookup(node.target)
        allowed = spec.slots if spec is not None else None
        float_slots = [s for s, a, st in statuses if st == FLOAT and (allowed is None or s[0] in allowed or s[0] == "kw")]
        index_slots = [s for s, a, st in statuses if st == INDEX and (allowed is None or s[0] in allowed)]
        has_float_out = _has_float_out(node)
        if any(st == FLOAT for _, _, st in statuses):
            status = FLOAT if has_float_out else OTHER
            slots = float_slots
        elif index_slots and spec is not None and spec.kind == "embedding":
            status, slots = FLOAT, index_slots
        elif index_slots and spec is not None and spec.kind == "route" and not has_float_out:
            status, slots = INDEX, index_slots
        else:
            status, slots = OTHER, []
        ann = NodeAnn(status, slots=slots, module_path=module_path(node))
        if spec is not None:
            ann.factors = [s for s in slots if s[0] in spec.factors]
        node.meta["dynlrp"] = ann
    # relevance can only reach ancestors of the explained output
    stack = [output_node]
    seen = set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        ann = n.meta.get("dynlrp")
        if ann is not None and ann.status in (FLOAT, INDEX):
            ann.relevant = True
            if n.target is operator.getitem:
                stack.append(n.args[0])
            else:
                stack.extend(a for s, a in tensor_slots(n) if s in ann.slots)
    return gm


# ops a normaliser's scale may be computed with (elementwise on statistics of the value itself)
_REDUCTIONS = {"mean", "sum", "var", "std", "var_mean", "amax", "norm", "linalg_vector_norm", "native_layer_norm"}
_SCALE_OPS = _REDUCTIONS | {
    "add", "sub", "mul", "div", "rsqrt", "sqrt", "pow", "reciprocal", "clamp", "clamp_min", "clamp_max", "_to_copy",
    "reshape", "view", "expand", "unsqueeze", "squeeze", "alias", "clone", "abs", "neg", "square", "maximum",
}


_ELEMENTWISE = {
    "add", "sub", "mul", "div", "pow", "neg", "_to_copy", "clone", "alias", "tanh", "erf", "erfc", "sigmoid", "exp",
    "expm1", "log", "log1p", "sqrt", "rsqrt", "reciprocal", "abs", "square", "clamp", "clamp_min", "clamp_max",
    "relu", "gelu", "silu", "softplus", "hardtanh", "hardsigmoid", "hardswish", "sign", "where",
}


def _data_args(n: torch.fx.Node) -> list[torch.fx.Node]:
    return [x for s, x in tensor_slots(n) if (x.meta.get("dynlrp") or NodeAnn(OTHER)).status == FLOAT]


def _reaches(
    b: torch.fx.Node, bases: set, ops: set, need_reduction: bool, limit: int = 32, canon: dict | None = None
) -> bool:
    """True when every data path upwards from ``b`` through ``ops`` ends in ``bases`` (and, with
    ``need_reduction``, every path passes a reduction); ``canon`` maps nodes to the first node computing the same
    value (:func:`~dynlrp_fx.passes.values.value_numbers`), so a recomputed copy of a base counts as the base."""
    canon = canon or {}
    found = False
    stack = [(b, False)]
    steps = 0
    while stack:
        n, red = stack.pop()
        steps += 1
        if steps > limit:
            return False
        if canon.get(n, n) in bases:
            if need_reduction and not red:
                return False
            found = True
            continue
        ann = n.meta.get("dynlrp")
        if ann is None or ann.status != FLOAT:
            continue  # constants are fine
        if n.op != "call_function" or not hasattr(n.target, "_opname"):
            return False
        name = n.target._opname
        if name not in ops:
            return False
        data_args = _data_args(n)
        if not data_args:
            return False
        for x in data_args:
            stack.append((x, red or name in _REDUCTIONS))
    return found


def _strip_scaling(n: torch.fx.Node) -> list[torch.fx.Node]:
    """``n`` and the values it is a constant rescaling or cast of (``x``, ``0.5 * x``, ``x.float()``...)."""
    chain = [n]
    while n.op == "call_function" and getattr(n.target, "_opname", "") in ("_to_copy", "clone", "alias", "mul", "div"):
        data = _data_args(n)
        if len(data) != 1 or (n.target._opname == "div" and n.args[0] is not data[0]):
            break
        n = data[0]
        chain.append(n)
    return chain


def _centered(n: torch.fx.Node) -> torch.fx.Node | None:
    """``u`` when ``n`` is ``u - mean(u, dims, keepdim=True)`` (its variance is ``u``'s: ``x.var()`` scales it)."""
    if n.op != "call_function" or getattr(n.target, "_opname", "") != "sub" or len(n.args) < 2:
        return None
    u, m = n.args[0], n.args[1]
    if not (isinstance(u, torch.fx.Node) and isinstance(m, torch.fx.Node)) or m.op != "call_function":
        return None
    if getattr(m.target, "_opname", "") == "mean" and m.args and m.args[0] is u and n.kwargs.get("alpha", 1) == 1:
        return u
    return None


def detect_normalizers(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Mark products whose second factor is a function of the first as identity to the first factor.

    * normalisers: ``a * g(reduce(a))`` and ``a / g(reduce(a))`` (RMSNorm, decomposed LayerNorm): nothing flows
      into the variance path (AttnLRP);
    * decomposed activations: ``a * g(a)`` with ``g`` elementwise (``x * sigmoid(x)``, GELU-tanh
      ``0.5x * (1 + tanh(...x...))``): the activation as a whole gets the identity rule.

    Sets ``ann.extra["normalizer_slot"]`` to the slot of ``a``; the node's rule class becomes ``normalizer``.
    Values are compared by value number: in ConvNeXt's ``(x - u) / sqrt(((x - u) ** 2).mean() + eps)`` the two
    ``x - u`` are one value; a centred value ``x - mean(x)`` may also be scaled by a function of ``x`` itself
    (``(x - mean(x)) / sqrt(x.var() + eps)``).
    """
    canon = value_numbers(gm)
    for node in gm.graph.nodes:
        ann = node.meta.get("dynlrp")
        if ann is None or ann.status != FLOAT or node.op != "call_function":
            continue
        name = getattr(node.target, "_opname", "")
        if name not in ("mul", "div") or len(ann.slots) != 2:
            continue
        s0, s1 = ann.slots
        x0, x1 = node.args[s0[0]], node.args[s1[0]]
        pairs = [(s0, x0, x1), (s1, x1, x0)] if name == "mul" else [(s0, x0, x1)]
        for slot, a, b in pairs:
            bases = {canon.get(x, x) for x in _strip_scaling(a)}
            bases |= {canon.get(u, u) for u in map(_centered, list(bases)) if u is not None}
            if _reaches(b, bases, _SCALE_OPS, True, canon=canon):
                ann.extra["normalizer_slot"] = slot
                ann.extra["pattern"] = "normalizer"
                break
            if name == "mul" and _reaches(b, bases, _ELEMENTWISE, False, canon=canon):
                ann.extra["normalizer_slot"] = slot
                ann.extra["pattern"] = "activation"
                break
    return gm


def _mark_first_layers(gm: torch.fx.GraphModule) -> None:
    """First linear-class multilinear op(s) fed by an input through route ops only."""
    near_input = set()
    for node in gm.graph.nodes:
        ann = node.meta.get("dynlrp")
        if ann is None:
            continue
        if node.op == "placeholder":
            near_input.add(node)
            continue
        spec = lookup(node.target) if node.op == "call_function" else None
        fed = any(x in near_input for s, x in tensor_slots(node) if s in ann.slots)
        if node.target is operator.getitem and node.args[0] in near_input:
            near_input.add(node)
        elif spec is not None and spec.kind == "route" and fed:
            near_input.add(node)
        elif spec is not None and spec.kind == "multilinear" and fed:
            ann.first_layer = True


def _module_types(root: torch.nn.Module | None, node: torch.fx.Node) -> tuple:
    stack = node.meta.get("nn_module_stack") or {}
    types = []
    for path, tname in stack.values():
        t = None
        if root is not None and isinstance(path, str):
            try:
                t = type(root.get_submodule(path)) if path else type(root)
            except AttributeError:
                t = None
        types.append(t if t is not None else tname)
    return tuple(types)


#: ops whose output is >= 0 whatever their input
_NONNEG_SOURCES = {"relu", "sigmoid", "_softmax", "softmax", "exp", "abs", "sqrt", "hardsigmoid"}
#: ops whose output is >= 0 when every floating tensor operand is (values moved, pooled, summed or multiplied)
_NONNEG_KEEP = {
    "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "expand", "slice", "select", "squeeze",
    "unsqueeze", "clone", "_to_copy", "alias", "contiguous", "cat", "flatten", "index", "gather", "max_pool2d",
    "max_pool2d_with_indices", "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool2d", "_adaptive_avg_pool2d", "mean", "sum", "amax", "add", "mul", "upsample_nearest2d",
    "pixel_shuffle", "repeat", "stack", "dropout", "native_dropout",
}


def _clamp_floor(node: torch.fx.Node) -> float | None:
    """The lower bound of ``clamp``/``clamp_min``/``hardtanh`` as a number, if it is one."""
    name = node.target._opname
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min", node.kwargs.get("min_val", -1.0 if name == "hardtanh" else None))
    return float(lo) if isinstance(lo, (int, float)) else None


def nonnegative_nodes(gm: torch.fx.GraphModule) -> set:
    """Nodes whose value is provably ``>= 0`` (ReLU outputs and what pooling, reshaping, sums and products of
    such values give). Rules use it to skip the negative-input terms of gamma, z+ and alpha-beta."""
    nonneg: set = set()

    def tensor_args(n: torch.fx.Node) -> list:
        return [a for _, a in tensor_slots(n) if _is_float_val(a.meta.get("val"))]

    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is operator.getitem:
            src = n.args[0]
            if n.args[1] == 0 and src in nonneg:
                nonneg.add(n)
            continue
        name = getattr(n.target, "_opname", "")
        if name in _NONNEG_SOURCES:
            nonneg.add(n)
        elif name in ("clamp", "clamp_min", "hardtanh"):
            lo = _clamp_floor(n)
            if lo is not None and lo >= 0:
                nonneg.add(n)
        elif name in _NONNEG_KEEP:
            args = tensor_args(n)
            scalars = [
                a
                for a in (*n.args, *n.kwargs.values())
                if isinstance(a, (int, float)) and not isinstance(a, bool)
            ]
            if name in ("add", "mul") and any(a < 0 for a in scalars):
                continue  # relu(x) * -1, relu(x) + (-0.5), add(a, b, alpha=-1)
            if args and all(a in nonneg for a in args):
                nonneg.add(n)
    return nonneg


def _accumulates(node: torch.fx.Node) -> bool:
    if getattr(node.target, "_opname", "") not in ("index_put", "index_put_"):
        return False
    acc = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
    return bool(acc)


def assign_rules(gm: torch.fx.GraphModule, composite: Composite, root: torch.nn.Module | None = None) -> torch.fx.GraphModule:
    """Give every relevant data node a rule class and a rule; raise for ops without a table entry.

    Also records ``ann.extra["nonneg_slots"]``: the data operands that are provably ``>= 0``
    (:func:`nonnegative_nodes`), which rules read as ``ctx.meta["nonneg_slots"]``.

    Raises
    ------
    DynlrpUnsupportedOpError
        listing every uncovered op with the module paths that use it.
    """
    _mark_first_layers(gm)
    nonneg = nonnegative_nodes(gm)
    uncovered: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        ann = node.meta.get("dynlrp")
        if ann is None or not ann.relevant or node.op != "call_function" or node.target is operator.getitem:
            continue
        spec = lookup(node.target)
        if spec is None:
            uncovered.setdefault(str(node.target), [])
            path = ann.module_path or "<root>"
            if path not in uncovered[str(node.target)]:
                uncovered[str(node.target)].append(path)
            continue
        ann.rule_class = classify(spec, ann.slots, ann.extra)
        if ann.rule_class == "route" and _accumulates(node):
            ann.rule_class = "linear"  # index_put(accumulate=True) sums overlapping writes: a z-rule, not a route
        slot_nodes = dict(tensor_slots(node))
        ann.extra["nonneg_slots"] = tuple(s for s in ann.slots if slot_nodes.get(s) in nonneg)
        info = NodeInfo(node.name, node.target, ann.rule_class, ann.module_path, _module_types(root, node), ann.first_layer)
        ann.rule = composite.rule_for(info)
    if uncovered:
        lines = [f"  {op}  (used by: {', '.join(paths[:5])}{' ...' if len(paths) > 5 else ''})" for op, paths in uncovered.items()]
        raise DynlrpUnsupportedOpError(
            "no LRP rule for these ATen ops, which carry relevance in this model:\n"
            + "\n".join(lines)
            + "\nRegister how relevance flows through each, e.g. "
            "dynlrp.register_op(torch.ops.mylib.myop.default, 'affine') (kinds: route, affine, multilinear, unary, "
            "softmax, none, ...), or open an issue with the op name.",
            uncovered,
        )
    return gm


def iter_annotated(gm: torch.fx.GraphModule):
    for node in gm.graph.nodes:
        ann = node.meta.get("dynlrp")
        if ann is not None:
            yield node, ann


