"""Promise resolution: bind every promise node to the forward value it names (a memory policy).

DynamicLRP recovers forward values that autograd did not save at run time ("promises"). Here the complete
forward graph is available, so a promise is a node of the relevance half naming a forward value, and this pass
binds it at compile time. Two policies:

``keep``
    Bind each promise to the forward value itself: the value stays alive from the forward op that made it until
    the last relevance op that reads it.
``recompute``
    Rematerialise *cheap* forward values (pointwise ops such as ``relu``, ``gelu``, ``add``, ``mul``, dtype casts,
    ``cat``, view-like ops, inference batch norm and LayerNorm) in the relevance half, right before their first relevance use,
    when every tensor operand is a graph input (parameters, user inputs), another promised value (which the
    relevance half holds or recomputes anyway) or a cheap intermediate of the same kind (up to four levels: rotary
    embeddings ``q * cos + cat(-q2, q1) * sin`` from ``q``). The forward copy then dies as soon as the forward pass
    is done with it. Example: in ``conv -> relu -> conv`` the first conv's output ``z`` is promised (its rule needs
    it) and so is ``relu(z)`` (the second conv's input); with ``recompute`` only ``z`` is held across the turn
    from forward to relevance, and ``relu(z)`` is recomputed from it, which costs one pointwise kernel and saves
    one activation per layer (with batch norm, ``relu(bn(z))``: two). Inputs of a recomputation that are
    recomputed themselves get private copies that die with it, so a chain (a residual stream of ``add`` s) is
    recomputed, not brought to life at its first use; a value whose recomputation would run more than 32 ops (a
    LayerNorm counts as 4) is kept instead, so long residual streams are held every few layers (checkpoints).

Why a rule rather than a min-cut: AOTAutograd's min-cut partitioner (``min_cut_rematerialization_partition``)
needs the graph split into a forward and a backward part by ``tangents_*`` dependence, but the relevance half
depends on the forward output through the seed; and min-cut can raise memory as well as lower it. The rule
above never extends the lifetime of a forward value (recomputations read only values that are alive in the
relevance half anyway), so it cannot raise peak memory in eager execution except by the transient recomputed
values themselves; :func:`~dynlrp_fx.passes.memory.peak_live_bytes` measures the effect (see
``tests/test_memory_policy.py``).

``recompute`` is the default because it lowers the peak memory of an explanation for little extra time (the
benchmark tables under ``benchmarks/results``); ``keep`` remains available. See ``docs/design.md`` (section 6,
"Pairing, promises and memory policies") for the design and ``benchmarks/results/tuning_notes.md`` for the measurements.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from ..rules.table import facts, recompute_cost
from .nodes import RECOMPUTED_FROM, bytes_hint, is_cheap, is_recomputed, is_view_of, numel_hint, tensor_inputs
from .pair import promise

__all__ = ["resolve_promises", "hold_small_outputs", "hold_outputs_not_inputs", "step_back_residual_streams",
           "hold_activation_ratios", "count_promises", "POLICIES", "DEFAULT_POLICY"]

if TYPE_CHECKING:
    from .pipeline import CompileContext

POLICIES = ("keep", "recompute")
_MAX_DEPTH = 4  # cheap intermediates (not promised) a recomputation may pass through
# ops one private recomputation may run (views count 0, a LayerNorm 4: rules.table's recompute_cost); bounds the
# chains along residual streams of cheap ops, so long streams are held every few layers instead
_MAX_COST = 32
_SMALL = 8  # a promised value this many times smaller than its op's largest input is held, never recomputed
DEFAULT_POLICY = "recompute"


def _small(v: fx.Node) -> bool:
    """Whether ``v`` is at most ``1 / _SMALL`` the size of the largest tensor its op reads (a LayerNorm's
    ``rstd``, a reduction): recomputing it would re-read (and, along a residual stream, recompute) a value
    ``_SMALL`` times its size to save its own few bytes, so it is held instead."""
    src = v.args[0] if v.target is operator.getitem else v
    if not isinstance(src, fx.Node) or src.op != "call_function":
        return False
    own = numel_hint(v.meta.get("val"))
    # a lookup (``embedding``, ``gather``) reads as many elements of its table as it returns, not the table
    lookup = facts(src.target).lookup
    read = [numel_hint(u.meta.get("val")) for u in tensor_inputs(src) if not (lookup and u is src.args[0])]
    return own is not None and any(r is not None and own * _SMALL <= r for r in read)


def count_promises(gm: fx.GraphModule) -> int:
    """Number of unresolved promise nodes."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is promise)


def resolve_promises(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Bind every promise node to a forward value (``keep``) or a recomputation (``recompute``) by
    ``ctx.promise_policy``; returns ``gm``.

    See the module doc for the policies.
    """
    policy = ctx.promise_policy
    if policy not in POLICIES:
        raise ValueError(f"unknown promise policy {policy!r}; expected one of {POLICIES}")
    g = gm.graph
    promises = [n for n in g.nodes if n.op == "call_function" and n.target is promise]
    recompute: set[fx.Node] = set()  # promised values and the cheap intermediates they are recomputed from
    if policy == "recompute":
        promised = {p.meta["promise_of"] for p in promises}
        order = {n: i for i, n in enumerate(g.nodes)}
        known: dict[fx.Node, bool] = {}

        def recomputable(v: fx.Node, depth: int = 0) -> bool:
            """A cheap op (or one output of a cheap multi-output op) whose tensor inputs are graph inputs, promised
            values (held or recomputed themselves), or cheap intermediates of the same kind (a few levels deep:
            rotary embeddings are ``q * cos + cat(-q2, q1) * sin``)."""
            if v not in known:
                src = v.args[0] if v.target is operator.getitem else v
                known[v] = (
                    isinstance(src, fx.Node)
                    and depth <= _MAX_DEPTH
                    and is_cheap(src)
                    and all(
                        u.op == "placeholder" or u in promised or recomputable(u, depth + 1)
                        for u in tensor_inputs(src)
                    )
                )
                if known[v] and src is not v:
                    known[src] = True
                # cheap intermediates are recomputed (as private inputs) wherever a recomputed value reads them
                recompute.update(u for u in (v, src) if known[v] and u not in promised)
            return known[v]

        size: dict[fx.Node, int] = {}

        def cost(v: fx.Node) -> int:
            """Ops one private recomputation of ``v`` runs (through recomputed inputs; views and held values: 0)."""
            if v.op != "call_function" or v not in recompute:
                return 0
            if v not in size:
                src = v.args[0] if v.target is operator.getitem else v
                own = recompute_cost(src.target)  # views are free
                size[v] = own + sum(cost(u) for u in tensor_inputs(src))
            return size[v]

        for v in sorted(promised, key=order.__getitem__):  # topological: inputs are decided first
            if _small(v):
                continue  # a LayerNorm's rstd, a reduction: holding it costs less than re-reading its input
            if recomputable(v):
                recompute.add(v)
                if cost(v) > _MAX_COST:  # a long chain (a residual stream of cheap ops): keep this one
                    recompute.discard(v)
                    size.pop(v, None)
    copies: dict[fx.Node, fx.Node] = {}

    def materialize(v: fx.Node, before: fx.Node, share: bool) -> fx.Node:
        """The value of ``v`` at ``before``: ``v`` itself when held, else a recomputation. ``share``: the copy may
        serve later uses (a promise's own value); inputs of a recomputation get private copies, which die with it,
        so recomputing one value never materialises another one early (a chain along a residual stream would
        otherwise bring every layer's copy to life at the first layer)."""
        if v not in recompute:
            return v
        if share and v in copies:
            return copies[v]
        # one output of a multi-output op shares the op's copy (a batch norm whose output a ReLU's rule reads
        # and whose tuple its own rule reads: one recomputation, not a private one and a shared one)
        tup = share and v.target is operator.getitem
        inputs = {u: materialize(u, before, tup) for u in tensor_inputs(v)}
        with g.inserting_before(before):
            c = g.node_copy(v, lambda a: inputs.get(a, a))
        c.meta = dict(v.meta)
        c.meta[RECOMPUTED_FROM] = v.name
        if share:
            copies[v] = c
        return c

    for p in promises:  # graph order: a copy is created at its first use and dominates all later ones
        target = materialize(p.meta["promise_of"], p, True)
        p.replace_all_uses_with(target)
        g.erase_node(p)
    gm.recompile()
    return gm


def hold_small_outputs(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Read small outputs of recomputed multi-output ops from the forward op instead (after ``lower``).

    ``resolve_promises`` decides per promised *node*, before the rules are lowered, so a LayerNorm whose rule reads
    only its ``rstd`` (AttnLRP's, in gradient form) is promised whole and recomputed: from its input, which along a
    residual stream is itself recomputed from the LayerNorm before it (up to the chain bound), every layer. Once
    the rules are ATen ops the outputs read are known; an output that is small (at most ``1 / _SMALL`` of the
    largest tensor its op reads: ``rstd`` and ``mean`` of a LayerNorm are one value per row) is then taken from
    the forward op, where holding it costs a few bytes, and the recomputation, now unread, is left to
    ``eliminate_dead_code``. Returns ``gm``."""
    del ctx
    g = gm.graph
    nodes = list(g.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    by_name = {n.name: n for n in nodes}
    changed = False
    for c in nodes:
        v = by_name.get(c.meta.get(RECOMPUTED_FROM, ""))
        if v is None or v is c or is_recomputed(v) or not isinstance(
                c.meta.get("val"), (tuple, list)):
            continue
        for u in list(c.users):
            if not (u.target is operator.getitem and isinstance(u.args[1], int) and _small(u)):
                continue
            _read_from_forward(g, v, u, order, order[c])
            changed = True
    if changed:
        gm.recompile()
    return gm


def _read_from_forward(g: fx.Graph, v: fx.Node, u: fx.Node, order: dict, before: int) -> None:
    """Point the readers of ``u`` (``getitem`` of a recomputed copy of the multi-output op ``v``) at ``v``'s own
    output of the same index: a ``getitem`` of ``v`` that comes before position ``before``, else a new one right
    after ``v``; then erase ``u``."""
    i = u.args[1]
    fwd = next((w for w in v.users if w.op == "call_function" and w.target is operator.getitem
                and w.args[1] == i and order.get(w, len(order)) < before), None)
    if fwd is None:
        with g.inserting_after(v):
            fwd = g.call_function(operator.getitem, (v, i))
        fwd.meta = dict(u.meta)
        fwd.meta.pop(RECOMPUTED_FROM, None)
        order[fwd] = order[v]  # right after v: the next reader of this output reuses it
    u.replace_all_uses_with(fwd)
    g.erase_node(u)


def hold_outputs_not_inputs(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Hold a recomputed value instead of the inputs it is recomputed from, where they serve nothing else (after
    the lowered program is simplified and its dead code removed).

    ``resolve_promises`` decides before lowering, when a batch norm's rule still pulls back with the batch norm's
    VJP, which reads its input ``z``: ``z`` is then held and the output ``y = bn(z)`` that the stabiliser and the
    ReLU's rule read is recomputed from it, once per reader (and once more inside each residual-stream
    recomputation). ``scale_batch_norm_pullbacks`` later turns the pullback into a per-channel scale, and ``z`` is
    read only to recompute ``y``. Holding ``y`` instead costs the same bytes and no recomputation. A forward op
    ``v`` qualifies when each of its copies (``dynlrp_recomputed_from``) reads exactly ``v``'s operands, each
    operand that is not a graph input is read by ``v`` and its copies alone (so it dies with the forward pass), and
    the outputs of ``v`` that the copies serve take no more bytes than those operands. Returns ``gm``."""
    del ctx
    g = gm.graph
    by_name = {n.name: n for n in g.nodes}
    order = {n: i for i, n in enumerate(g.nodes)}
    copies: dict[fx.Node, list[fx.Node]] = {}
    for c in g.nodes:
        v = by_name.get(c.meta.get(RECOMPUTED_FROM, ""))
        if v is not None and v is not c and not is_recomputed(v) and c.target is v.target:
            copies.setdefault(v, []).append(c)
    changed = False
    for v, cs in copies.items():
        if v.target is operator.getitem:
            continue  # the tuple's copy decides
        operands = tensor_inputs(v)
        if any(tensor_inputs(c) != operands or c.args[1:] != v.args[1:] or c.kwargs != v.kwargs for c in cs):
            continue
        freed = [u for u in operands if u.op != "placeholder"]
        allowed = {v, *cs}
        if not freed or any(set(u.users) - allowed for u in freed):
            continue
        tuple_out = isinstance(v.meta.get("val"), (tuple, list))
        if tuple_out:
            read = {u.args[1] for c in cs for u in c.users}
            if not all(isinstance(i, int) for i in read):
                continue
            held = [bytes_hint(v.meta["val"][i]) for i in read]
        else:
            held = [bytes_hint(v.meta.get("val"))]
        need = [bytes_hint(u.meta.get("val")) for u in freed]
        if any(b is None for b in held + need) or sum(held) > sum(need):
            continue
        for c in cs:
            if tuple_out:
                for u in list(c.users):
                    _read_from_forward(g, v, u, order, order[c])
            else:
                c.replace_all_uses_with(v)
            g.erase_node(c)
        changed = True
    if changed:
        g.lint()
        gm.recompile()
    return gm


def _free_to_keep(n: fx.Node) -> bool:
    """Whether keeping ``n`` alive longer keeps nothing but views alive: a value the program does not recompute
    (a held forward value), or a recomputed view of one."""
    if not is_recomputed(n):
        return True
    return recompute_cost(n.target) == 0 and all(_free_to_keep(u) for u in tensor_inputs(n))


def _summand_position(w: fx.Node, v: fx.Node) -> int | None:
    """Position (0 or 1) of ``v`` in the forward ``w = add.Tensor(a, b)`` when ``v`` can be read back as
    ``w - other`` (same shape and dtype as ``w``, the other operand a tensor of ``w``'s dtype, alpha 1 or ``v``
    first), else ``None``."""
    if w.target is not torch.ops.aten.add.Tensor or len(w.args) != 2 or set(w.kwargs) - {"alpha"}:
        return None
    alpha = w.kwargs.get("alpha", 1)
    wv, vv = w.meta.get("val"), v.meta.get("val")
    if not (isinstance(wv, torch.Tensor) and isinstance(vv, torch.Tensor) and wv.dtype.is_floating_point):
        return None
    if tuple(wv.shape) != tuple(vv.shape) or wv.dtype != vv.dtype:
        return None
    for i in (0, 1):
        other = w.args[1 - i]
        ov = other.meta.get("val") if isinstance(other, fx.Node) else None
        if w.args[i] is v and isinstance(ov, torch.Tensor) and ov.dtype == wv.dtype and (i == 0 or alpha == 1):
            return i
    return None


def _read_after(n: fx.Node, pos: int, order: dict) -> bool:
    """Whether ``n``'s storage is read at or after position ``pos``, by ``n`` or a view of it (so reading ``n``
    there too extends no lifetime): ViT's q, k and v are views of one recomputed packed projection each, read by
    the attention's rule after the next one is made."""
    return any(order[u] >= pos or (is_view_of(u, n) and _read_after(u, pos, order)) for u in n.users)



def step_back_residual_streams(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Read a recomputed summand of a residual add back from the sum, ``v = w - t``, where the relevance half
    already holds ``w = v + t`` (after ``lower``).

    ``resolve_promises`` recomputes a value of a residual stream from the values it holds: along a pre-LN
    transformer's stream ``x_l = x_{l-1} + b_l`` that is a chain of adds back to the last held checkpoint, every
    time a layer's rule reads ``x_{l-1}`` (ViT-B/16 under ``epsilon``: 698 adds and 51 concatenations of the patch
    embedding per explanation). The relevance half visits the layers in reverse, so when it needs ``x_{l-1}`` it
    has just read ``x_l``; the branch output ``b_l`` is held for the layer's own rule. One subtraction then replaces
    the chain, which dies unread. The result differs from the forward value by rounding (a few units in the last
    place of ``x_l``, accumulated over the layers); ``promise_policy="keep"`` reads the forward values themselves.

    A recomputation is replaced unless it is a link of such a chain (the copy of ``x_{l-1}`` that the copy of
    ``x_l`` adds to: the chain's top decides). Where the relevance half has made the same value before and reads
    it at or after this point anyway, that value is read (one copy, not one per reader; nothing lives longer). The
    operand ``t`` is read where the recomputation of ``w`` read it, and only when keeping it alive keeps no
    recomputed value but views alive. Runs after ``eliminate_dead_code``, so that no recomputation an earlier pass
    left unread counts as read. Returns ``gm``."""
    del ctx
    g = gm.graph
    by_name = {n.name: n for n in g.nodes}
    value: dict[fx.Node, fx.Node] = {}  # forward node -> the node of the relevance half that holds its value
    operands: dict[fx.Node, list] = {}  # forward add -> the relevance half's nodes of its two operands
    stamp: dict[fx.Node, int] = {}  # forward node -> position of the node that last made its value
    order = {n: i for i, n in enumerate(g.nodes)}
    changed = False
    for pos, c in enumerate(list(g.nodes)):
        v = by_name.get(c.meta.get(RECOMPUTED_FROM, ""))
        if v is None or v is c or is_recomputed(v):
            continue
        if any(_summand_position(by_name.get(u.meta.get(RECOMPUTED_FROM, ""), u), v) is not None
               for u in c.users):
            continue  # a link of a chain (the copy of x_{l-1} that the copy of x_l adds to): its top decides
        # where the value of v can come from: v made before (reused), or w = v + t made before (v = w - t)
        ways = [(stamp[v], 1, None, None)] if v in value and _read_after(value[v], pos, order) else []
        ways += [(stamp[w], 0, w, i) for w in v.users if w in operands
                 for i in [_summand_position(w, v)] if i is not None and _free_to_keep(operands[w][1 - i])]
        if v.target is torch.ops.aten.add.Tensor and c.target is v.target and v not in operands:
            operands[v] = list(c.args)  # what the copy reads for v's operands stays readable for a step back
        stamp[v] = pos
        if not ways:
            value[v] = c
            continue
        _, _, w, i = max(ways, key=lambda way: way[:2])  # the value made most recently; reuse before a step back
        if w is not None:
            alpha = w.kwargs.get("alpha", 1)
            with g.inserting_before(c):
                s = g.call_function(torch.ops.aten.sub.Tensor, (value[w], operands[w][1 - i]),
                                    {"alpha": alpha} if alpha != 1 else {})
            s.meta = {k: x for k, x in c.meta.items() if k != RECOMPUTED_FROM}
            s.meta["dynlrp_stepped_back_from"] = w.name
            order[s] = pos
            value[v] = s
        c.replace_all_uses_with(value[v])
        changed = True
    if changed:
        # (a multi-output op reused may now have two getitems of one output: reuse_buffers keys storage by output)
        # the copies replaced, and the chains they were the tops of, are unread now
        for n in reversed(list(g.nodes)):
            if is_recomputed(n) and not n.users:
                g.erase_node(n)
        gm.recompile()
    return gm


def _same_value(a: fx.Node, v: fx.Node, by_name: dict) -> bool:
    """Whether ``a`` is the forward value ``v``: ``v`` itself, a recomputed copy of it, or the same view op with the
    same arguments on the same value."""
    if a is v or (is_recomputed(a) and by_name.get(a.meta[RECOMPUTED_FROM]) is v):
        return True
    src = a.args[0] if a.args else None
    return (isinstance(src, fx.Node) and is_view_of(a, src) and a.target is v.target and a.args[1:] == v.args[1:]
            and a.kwargs == v.kwargs and isinstance(v.args[0], fx.Node) and _same_value(src, v.args[0], by_name))


def _dying_cone(top: list) -> tuple[set, set]:
    """``(cone, roots)``: the nodes ``top`` and every tensor node that only they (transitively) read, which die
    with them; and the tensors the cone reads from outside it."""
    cone = set(top)
    grew = True
    while grew:
        grew = False
        for m in list(cone):
            for a in m.all_input_nodes:
                if (a not in cone and a.op == "call_function" and isinstance(a.meta.get("val"), torch.Tensor)
                        and all(u in cone for u in a.users)):
                    cone.add(a)
                    grew = True
    roots = {a for m in cone for a in m.all_input_nodes
             if a not in cone and isinstance(a.meta.get("val"), torch.Tensor)}
    return cone, roots


def hold_activation_ratios(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Compute an identity rule's ratio ``f(x) / x`` in the forward pass and hold it instead of ``x``.

    The identity rule on an activation ``y = f(x)`` (GELU, tanh) hands on ``G * f(x) / x`` in gradient form
    (:func:`~dynlrp_fx.rules.base.divide_zero_at_zero`: ``nan_to_num(f(x) / x)``). Under ``recompute`` the program
    held ``x`` (a projection's output, as large as the activation) and re-ran ``f`` on it in the relevance half
    (BERT-base: 12 GELUs of (B, 128, 3072) per explanation). The forward pass has ``f(x)`` and ``x`` at hand: the
    ratio is computed there, from the forward's own ``y``, and held instead of ``x``, which then dies with the
    forward pass. Rewritten only where the ratio's operands serve nothing else after the forward op (so the held
    bytes do not grow) and ``f`` is a one-operand op recomputed with the forward's arguments. The values are the
    same bit for bit. Returns ``gm``."""
    del ctx
    g = gm.graph
    by_name = {n.name: n for n in g.nodes}
    order = {n: i for i, n in enumerate(g.nodes)}
    changed = False
    for q in list(g.nodes):
        if q.target is not torch.ops.aten.nan_to_num.default or not isinstance(q.args[0], fx.Node):
            continue
        d = q.args[0]
        if d.target is not torch.ops.aten.div.Tensor or len(d.users) != 1 or not all(
                isinstance(a, fx.Node) for a in d.args[:2]):
            continue
        c, b = d.args[:2]
        f = by_name.get(c.meta.get(RECOMPUTED_FROM, "")) if is_recomputed(c) else None
        if f is None or is_recomputed(f) or f.target is not c.target or len(tensor_inputs(f)) != 1:
            continue
        x = f.args[0]
        if not (isinstance(x, fx.Node) and c.args[1:] == f.args[1:] and c.kwargs == f.kwargs
                and isinstance(c.args[0], fx.Node) and _same_value(c.args[0], x, by_name) and _same_value(b, x, by_name)):
            continue
        cone, roots = _dying_cone([q, d])
        # the held values the ratio reads must serve nothing after the forward op, so they die with it
        if any(order[u] > order[f] for r in roots for u in r.users if u not in cone):
            continue
        freed, held = [bytes_hint(r.meta.get("val")) for r in roots if r.op != "placeholder"], bytes_hint(q.meta.get("val"))
        if held is None or any(v is None for v in freed) or held > sum(freed):
            continue
        with g.inserting_after(f):
            fd = g.call_function(torch.ops.aten.div.Tensor, (f, x), dict(d.kwargs))
        with g.inserting_after(fd):
            fq = g.call_function(torch.ops.aten.nan_to_num.default, (fd, *q.args[1:]), dict(q.kwargs))
        fd.meta, fq.meta = dict(d.meta), dict(q.meta)
        order[fd] = order[fq] = order[f]
        q.replace_all_uses_with(fq)
        changed = True
    if changed:
        g.eliminate_dead_code()  # the relevance half's ratio and what fed it alone
        gm.recompile()
    return gm
