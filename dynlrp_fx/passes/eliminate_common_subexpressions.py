"""``eliminate_common_subexpressions``: merge repeated pure ATen calls that compute the same value."""

from __future__ import annotations

import contextlib
import operator
from typing import TYPE_CHECKING, Any

import torch
from torch._guards import detect_fake_mode

from ..rules.table import facts
from .nodes import bytes_hint, is_cheap, numel_hint, tensor_inputs
from .values import cse_key as _cse_key

__all__ = ["eliminate_common_subexpressions"]

if TYPE_CHECKING:
    from .pipeline import CompileContext


def _smaller_than_operands(node: torch.fx.Node) -> bool:
    """Whether ``node``'s outputs together take fewer bytes than its largest tensor operand (example sizes)."""
    own = bytes_hint(node.meta.get("val"))
    read = [bytes_hint(u.meta.get("val")) for u in tensor_inputs(node)]
    return own is not None and any(r is not None and own < r for r in read)


def eliminate_common_subexpressions(gm: torch.fx.GraphModule, ctx: CompileContext) -> torch.fx.GraphModule:
    """Merge repeated pure ATen calls that compute the same value into one; returns ``gm``.

    Rules that pull relevance back through an op with its VJP re-run the op (e.g. max-pooling, for its indices)
    on the very values the forward pass used, and the conservation ledger sums a relevance tensor both as the
    output of one op and as the input of the next. Such repeats are merged. Values are numbered through cheap
    pointwise and view ops without merging those: the ``recompute`` memory policy duplicates them on purpose,
    and an op that reads a recomputed copy is merged with its forward twin only when holding the twin's result
    costs fewer bytes than the largest operand it reads: a reduction, or a strided max-pool (the max-pool rule's
    VJP re-runs the pool for its indices, on a recomputed activation: ResNet-50's stem pool at 112x112 is ~2% of an
    explanation at batch 1); int64 indices read that way are held as int32 (a quarter of the activation's bytes).
    """
    del ctx  # reads nothing from the context
    # values that an in-place op writes to stay distinct (two zeros_like() buffers may be filled differently)
    mutated = {
        a
        for n in gm.graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
        for a in n.all_input_nodes
    }
    canon: dict[torch.fx.Node, torch.fx.Node] = {}  # node -> first node known to compute the same value
    held: list[torch.fx.Node] = []  # forward twins whose outputs the relevance half now reads
    seen: dict[Any, torch.fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node in mutated:
            continue
        key = _cse_key(node, canon)
        if key is None:
            continue
        prev = seen.get(key)
        if prev is None:
            seen[key] = node
            continue
        same_operands = _cse_key(node, {}) == _cse_key(prev, {})
        reduction = facts(node.target).reduction
        if is_cheap(node) or not (same_operands or reduction or _smaller_than_operands(node)):
            canon[node] = prev  # the same value, kept as a separate computation
            continue
        if not (same_operands or reduction):
            held.append(prev)  # merged for its smaller result: the relevance half now reads the forward op's
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    for prev in dict.fromkeys(held):
        for u in [u for u in prev.users if u.target is operator.getitem]:
            _hold_narrow(gm.graph, u)
    gm.recompile()
    return gm


def _hold_narrow(g: torch.fx.Graph, u: torch.fx.Node) -> None:
    """``u`` reads an output of a forward op that a later twin was merged into: when it is an int64 index (a
    max-pool's indices, which the forward pass itself does not read) into an operand of fewer than 2**31 elements,
    the forward pass keeps it as int32 (half the bytes, held until its reader) and ``u``'s readers get it back as
    int64."""
    src, i = u.args
    val = u.meta.get("val")
    sizes = [numel_hint(a.meta.get("val")) for a in tensor_inputs(src)]
    if (not isinstance(val, torch.Tensor) or val.dtype != torch.int64 or not sizes
            or any(n is None or n >= 2**31 for n in sizes)):
        return
    fake = detect_fake_mode([val])
    with g.inserting_after(src):
        fwd = g.call_function(operator.getitem, (src, i))
    with g.inserting_after(fwd):
        narrow = g.call_function(torch.ops.aten._to_copy.default, (fwd,), {"dtype": torch.int32})
    with g.inserting_before(u):
        wide = g.call_function(torch.ops.aten._to_copy.default, (narrow,), {"dtype": torch.int64})
    fwd.meta = dict(u.meta)
    with fake or contextlib.nullcontext():
        narrow.meta["val"] = val.to(torch.int32)
        wide.meta["val"] = val.to(torch.int32).to(torch.int64)
    u.replace_all_uses_with(wide)
    g.erase_node(u)
