"""``unify_batch``: tie the batch dimension of every batched input to the first one's."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx

__all__ = ["unify_batch"]

if TYPE_CHECKING:
    from .pipeline import CompileContext


def unify_batch(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Tie the batch dimension of every batched input to the first one's with a no-op ``view``.

    In the lowered graph all batched inputs share one batch symbol, but ``torch.compile`` sees each input's
    dim 0 as its own symbol; broadcasting one against another then makes it guard on their ranges (and
    recompile for batch 1 or large batches). A ``view(x, [batch_of_first, ...])`` instead gives an *equality*
    guard that holds for every call, so one compiled program serves all batch sizes.
    """
    batch_symbol = ctx.traced.batch_symbol if ctx.traced is not None else None
    if not hasattr(batch_symbol, "free_symbols"):
        return gm
    g = gm.graph
    phs = [n for n in g.nodes if n.op == "placeholder"]
    batched = []
    for ph in phs:
        v = ph.meta.get("val")
        if isinstance(v, torch.Tensor) and v.ndim >= 1 and isinstance(v.shape[0], torch.SymInt):
            if v.shape[0].node.expr == batch_symbol:
                batched.append(ph)
    if len(batched) < 2:
        return gm
    anchor = batched[0]
    with g.inserting_after(phs[-1]):
        b = g.call_function(torch.ops.aten.sym_size.int, (anchor, 0))
    last = b
    for ph in batched[1:]:
        v = ph.meta["val"]
        old_users = list(ph.users)
        sizes = [b]
        for d in range(1, v.ndim):
            s = v.shape[d]
            if isinstance(s, torch.SymInt):
                with g.inserting_after(last):
                    last = g.call_function(torch.ops.aten.sym_size.int, (ph, d))
                sizes.append(last)
            else:
                sizes.append(int(s))
        with g.inserting_after(last):
            tied = g.call_function(torch.ops.aten.view.default, (ph, sizes))
        tied.meta["val"] = v
        for u in old_users:
            u.replace_input_with(ph, tied)
        last = tied
    g.lint()
    gm.recompile()
    return gm
