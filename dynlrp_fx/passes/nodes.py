"""Node annotations shared by the analysis passes: :class:`NodeAnn` on ``node.meta["dynlrp"]`` and operand slots.

``node.meta["dynlrp"]`` holds a :class:`NodeAnn` for every node that depends on an explained input:

* ``status``: ``"float"`` (a floating value that depends on a float input or on an embedding lookup of an
  explained integer input), ``"index"`` (an integer value reached from an explained integer input through route
  ops only: token ids and their reshapes), or ``"other"`` (depends on inputs but carries no relevance: masks,
  comparisons, shape values).
* ``slots``: operand slots that receive relevance; ``rule_class`` / ``rule``: set by ``assign_rules``.

Only ``float``/``index`` operands are *data*: parameters, buffers, constants and masks derived from integer
inputs are not, so an attention mask never takes a share of relevance.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..rules import table
from ..rules.base import Rule

__all__ = ["NodeAnn", "FLOAT", "INDEX", "OTHER", "tensor_slots", "module_path", "iter_annotated", "is_float_value", "is_cheap", "numel_hint", "bytes_hint", "reads_only_first_output", "replace_first_output",
           "tensor_inputs", "size_key", "lazy_graph_module", "RECOMPUTED_FROM", "RESHAPES", "is_recomputed", "is_view_of"]

FLOAT, INDEX, OTHER = "float", "index", "other"

#: meta key of a forward value's copy made by the ``recompute`` memory policy: the name of the value it copies
RECOMPUTED_FROM = "dynlrp_recomputed_from"
#: the ATen ops that reshape a tensor to a shape given as an argument (``alias``, a reshape fact too, takes none)
RESHAPES = (torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)


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


def is_float_value(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and (v.dtype.is_floating_point or v.dtype.is_complex)


def _has_float_out(node: torch.fx.Node) -> bool:
    v = node.meta.get("val")
    if isinstance(v, (tuple, list)):
        return any(is_float_value(x) for x in v)
    return is_float_value(v)


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


def iter_annotated(gm: torch.fx.GraphModule):
    for node in gm.graph.nodes:
        ann = node.meta.get("dynlrp")
        if ann is not None:
            yield node, ann




def is_recomputed(node: fx.Node) -> bool:
    """Whether ``node`` is a copy of a forward value made by the ``recompute`` memory policy (not a model op)."""
    return RECOMPUTED_FROM in node.meta


def is_view_of(u: fx.Node, n: fx.Node) -> bool:
    """Whether ``u`` is an aliasing op (a view, by the op table) whose first operand is ``n``."""
    return (isinstance(u.target, torch._ops.OpOverload) and table.returns_alias(u.target) and bool(u.args)
            and u.args[0] is n)


def is_cheap(node: torch.fx.Node) -> bool:
    """A node whose op the ``recompute`` policy may rematerialise (:func:`dynlrp_fx.rules.table.is_cheap`), or
    one output of such a multi-output op."""
    if node.op == "call_function" and node.target is operator.getitem:
        return isinstance(node.args[0], torch.fx.Node) and is_cheap(node.args[0])
    return node.op == "call_function" and table.is_cheap(node.target)


def tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The operands of ``node`` that hold tensors (for an output of a multi-output op: the op itself)."""
    if node.target is operator.getitem:
        return list(node.all_input_nodes)
    return [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]


def numel_hint(val: Any) -> int | None:
    """Elements of a tensor value at the example sizes (``None``: not a tensor, or a size without a hint)."""
    if not isinstance(val, torch.Tensor):
        return None
    n = 1
    for size in val.shape:
        if isinstance(size, torch.SymInt):
            hint = getattr(size.node, "hint", None)
            if hint is None:
                return None
            size = hint
        n *= int(size)
    return n


def bytes_hint(val: Any) -> int | None:
    """Bytes of a tensor value at the example sizes (``None``: unknown; ``0`` for no value), summed over a tuple
    of them (a multi-output op's)."""
    if val is None:
        return 0
    if isinstance(val, (tuple, list)):
        parts = [bytes_hint(v) for v in val]
        return None if any(p is None for p in parts) else sum(parts)
    n = numel_hint(val)
    return None if n is None else n * val.element_size()


def size_key(s: Any) -> Any:
    """A size or stride for comparing and hashing: a plain int, or a sym-int's expression. Equal exactly when the
    printed forms are, but cheap: sympy hashes an expression once, while printing it costs each time."""
    return s.node.expr if isinstance(s, torch.SymInt) else s


def lazy_graph_module(root: torch.nn.Module, graph: torch.fx.Graph) -> torch.fx.GraphModule:
    """A ``GraphModule`` that generates its Python code only when it is first called or its code is read.

    The synthesis passes each rewrite the graph and ``recompile()``; generating the code of a graph of thousands of
    nodes takes a large part of a second, and only the final program's code is ever run (``torch.fx``'s own lazy
    module, which Inductor's passes use for the same reason)."""
    from torch.fx._lazy_graph_module import _LazyGraphModule

    return _LazyGraphModule(root, graph)


def reads_only_first_output(n: fx.Node) -> bool:
    """Whether only output 0 of multi-output node ``n`` is read (unread ``getitem`` s of the other outputs may still
    be there before dead-code elimination)."""
    return all(u.target is operator.getitem and (u.args[1] == 0 or not u.users) for u in n.users)


def replace_first_output(g: fx.Graph, n: fx.Node, new: fx.Node) -> None:
    """Point the readers of ``n``'s output 0 at ``new``, then erase ``n`` and its ``getitem`` s."""
    for u in list(n.users):
        if u.args[1] == 0:
            u.replace_all_uses_with(new)
        g.erase_node(u)
    g.erase_node(n)
