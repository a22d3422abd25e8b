"""``assign_rules``: a rule class and a rule for every relevant data node; uncovered ops are errors."""

from __future__ import annotations

import fnmatch
import operator
import warnings
from typing import TYPE_CHECKING

import torch

from ..errors import DynlrpInputError, DynlrpUnsupportedOpError
from ..rules.composite import NodeInfo
from ..rules.table import classify, lookup
from . import nonnegative
from .fold_batchnorm import merge_batchnorm_rules
from .nodes import tensor_slots

__all__ = ["assign_rules"]

if TYPE_CHECKING:
    from .pipeline import CompileContext


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


def _accumulates(node: torch.fx.Node) -> bool:
    if getattr(node.target, "_opname", "") not in ("index_put", "index_put_"):
        return False
    acc = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
    return bool(acc)


def assign_rules(gm: torch.fx.GraphModule, ctx: CompileContext) -> torch.fx.GraphModule:
    """Give every relevant data node a rule class and a rule from ``ctx.composite``; ops without a table entry are
    collected in ``ctx.uncovered`` (op -> module paths) and, when ``ctx.strict``, raised.

    Also records ``ann.extra["nonneg_slots"]``: the data operands that are provably ``>= 0``
    (:func:`~dynlrp_fx.passes.nonnegative.nonnegative_nodes`), which rules read as ``ctx.meta["nonneg_slots"]``, and
    ``ann.extra["relevance_where_positive"]`` on nodes whose relevance is provably zero wherever their value is
    ``<= 0`` (:func:`~dynlrp_fx.passes.nonnegative.relevance_only_where_positive`).

    Raises
    ------
    DynlrpUnsupportedOpError
        listing every uncovered op with the module paths that use it.
    """
    composite = ctx.composite
    root = ctx.traced.module_root if ctx.traced is not None else None
    _mark_first_layers(gm)
    nonneg = nonnegative.nonnegative_nodes(gm)
    uncovered: dict[str, list[str]] = {}
    used: set = set()  # composite entries that chose a rule
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
        ann.rule = composite.rule_for(info, used)
    if "merge_batchnorm" in getattr(composite, "canonizers", ()):
        merge_batchnorm_rules(gm, ctx)  # after every rule is known: it rewrites the rules of conv/BN pairs
    for node in nonnegative.relevance_only_where_positive(gm):
        node.meta["dynlrp"].extra["relevance_where_positive"] = True
    ctx.uncovered = uncovered
    if getattr(composite, "check_matches", False) and ctx.strict:
        _check_matches(gm, composite, used)
    if uncovered and ctx.strict:
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


def _check_matches(gm: torch.fx.GraphModule, composite, used: set) -> None:
    """A ``by_path`` glob matching no module of the model is an error (a typo would silently drop its rule); an
    entry that matched modules or ops but chose no rule (the rule fits none of their rule classes) warns."""
    paths = {str(p) for n in gm.graph.nodes for p, _t in (n.meta.get("nn_module_stack") or {}).values()}
    paths.discard("")
    for table, key in composite.unused(used):
        if table == "by_path" and not any(fnmatch.fnmatchcase(p, key) for p in paths):
            shown = sorted(paths)[:30]
            raise DynlrpInputError(
                f"Composite by_path {key!r} matches no module of this model, so its rule would never apply. Module "
                f"paths: {', '.join(shown)}{' ...' if len(paths) > 30 else ''} (names from model.named_modules(); "
                "globs like 'encoder.layer.*.attention')"
            )
        rule = getattr(composite, table)[key]
        warnings.warn(
            f"Composite {table}[{key!r}] = {rule!r} chose the rule of no node in this model (no matching "
            f"{'module' if table != 'by_op' else 'op'}, or none of rule class {sorted(rule.classes)})",
            stacklevel=2,
        )
