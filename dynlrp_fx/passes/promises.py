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
needs the graph split into a forward and a backward part by ``tangents_*`` dependence; our relevance half depends
on the forward output through the seed, and DESIGN.md section 4 measured min-cut at -35% memory on a small Llama but
+66% on a CNN. The rule above never extends the lifetime of a forward value (recomputations read only values that are
alive in the relevance half anyway), so it cannot raise peak memory in eager execution except by the transient
recomputed values themselves; :func:`peak_live_bytes` measures the effect (see ``tests/test_memory_policy.py`` and the
benchmark tables under ``benchmarks/results``).

``recompute`` is the default: on an H200 (``benchmarks/results/NVIDIA_H200.md``, batch 16) it lowered the peak
extra memory by 24% (VGG16), 36% (ViT-B/16) and 37% (BERT-base) for 0-5% more time, and on the CPU
(``benchmarks/results/cpu.md``) it is what brings the eager peak to or below that of gradient x input on the CNNs;
``keep`` remains available.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from .inplace import returns_alias
from .pair import promise

__all__ = ["resolve_promises", "count_promises", "peak_live_bytes", "POLICIES", "DEFAULT_POLICY"]

POLICIES = ("keep", "recompute")
_MAX_DEPTH = 4  # cheap intermediates (not promised) a recomputation may pass through
# ops one recomputation may run (bounds chains along residual streams of cheap ops). With LayerNorm recomputed
# (2-core CPU, batch 1, peak / eager gradient x input, time interleaved in one process): bound 8: BERT 1.05x, ViT-B/16
# 224px 1.09x, Llama-8L 1.11x (rotary chains cut short, worse than without LayerNorm: 1.09x), time unchanged; bound 32
# with a LayerNorm as 1 op: BERT 1.02x but +14% time (chains through every LayerNorm of a post-LN stream); bound 32
# with a LayerNorm as 4 (:data:`_COST`): BERT 1.04x, GPT-2 0.96x, ViT 224px 1.06x (1.24x without LayerNorm), Llama
# unchanged, for +5% time
_MAX_COST = 32
DEFAULT_POLICY = "recompute"

_aten = torch.ops.aten
#: view-like / copy ops that are as cheap as pointwise ops to recompute (no pointwise tag in torch)
_CHEAP_EXTRA = {
    _aten.view.default,
    _aten.reshape.default,
    _aten._unsafe_view.default,
    _aten.permute.default,
    _aten.expand.default,
    _aten.squeeze.dim,
    _aten.squeeze.dims,
    _aten.unsqueeze.default,
    _aten.t.default,
    _aten.transpose.int,
    _aten.slice.Tensor,
    _aten.select.int,
    _aten.alias.default,
    _aten._to_copy.default,
    _aten.cat.default,  # rotary embeddings: cat(-q2, q1)
    # inference batch norm is a per-channel affine map (its other two outputs are empty): recomputing it from the
    # convolution output that the relevance half holds anyway saves one activation per conv-bn layer (ResNets)
    _aten._native_batch_norm_legit_no_training.default,
    # a LayerNorm output is its input's rule operand and the next linear layer's input: recomputing it (its input
    # is held or recomputed for the LayerNorm rule anyway) saves one activation per LayerNorm (transformers)
    _aten.native_layer_norm.default,
}
#: ops a recomputation counts as more than one (cost units per call; views 0, other cheap ops 1): a LayerNorm reads
#: its input twice and reduces it. With 4, chains along post-LN residual streams (BERT: add, LayerNorm, add,
#: LayerNorm per layer) stop after about three layers; see the measurements above
_COST = {_aten.native_layer_norm.default: 4}


def count_promises(gm: fx.GraphModule) -> int:
    """Number of unresolved promise nodes."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is promise)


def _is_cheap(node: fx.Node) -> bool:
    """A pointwise, view-like or other cheap op (:data:`_CHEAP_EXTRA`), or one output of such a multi-output op."""
    if node.op == "call_function" and node.target is operator.getitem:
        return isinstance(node.args[0], fx.Node) and _is_cheap(node.args[0])
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    op = node.target
    if torch.Tag.nondeterministic_seeded in op.tags or op._schema.is_mutable:
        return False
    return torch.Tag.pointwise in op.tags or op in _CHEAP_EXTRA


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    if node.target is operator.getitem:  # an output of a multi-output op: its input is the op itself
        return list(node.all_input_nodes)
    return [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]


def resolve_promises(gm: fx.GraphModule, policy: str = DEFAULT_POLICY) -> fx.GraphModule:
    """Bind every promise node to a forward value (``keep``) or a recomputation (``recompute``); returns ``gm``.

    See the module doc for the policies.
    """
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
                    and _is_cheap(src)
                    and all(
                        u.op == "placeholder" or u in promised or recomputable(u, depth + 1)
                        for u in _tensor_inputs(src)
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
                own = (  # views are free
                    _COST.get(src.target, 1)
                    if isinstance(src.target, torch._ops.OpOverload) and not returns_alias(src.target)
                    else 0
                )
                size[v] = own + sum(cost(u) for u in _tensor_inputs(src))
            return size[v]

        for v in sorted(promised, key=order.__getitem__):  # topological: inputs are decided first
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
        inputs = {u: materialize(u, before, False) for u in _tensor_inputs(v)}
        with g.inserting_before(before):
            c = g.node_copy(v, lambda a: inputs.get(a, a))
        c.meta = dict(v.meta)
        c.meta["dynlrp_recomputed_from"] = v.name
        if share:
            copies[v] = c
        return c

    for p in promises:  # graph order: a copy is created at its first use and dominates all later ones
        target = materialize(p.meta["promise_of"], p, True)
        p.replace_all_uses_with(target)
        g.erase_node(p)
    gm.recompile()
    return gm


def _nbytes(v: Any, seen: set) -> int:
    if isinstance(v, torch.Tensor):
        try:
            st = v.untyped_storage()
            key = st.data_ptr()
            if key in seen or st.nbytes() == 0:
                return 0
            seen.add(key)
            return st.nbytes()
        except (RuntimeError, NotImplementedError):
            return v.numel() * v.element_size()
    if isinstance(v, (list, tuple)):
        return sum(_nbytes(x, seen) for x in v)
    return 0


def peak_live_bytes(gm: fx.GraphModule, *args: Any) -> tuple[int, Any]:
    """Run ``gm`` node by node, freeing each value after its last use, and return ``(peak_bytes, outputs)``.

    ``peak_bytes`` is the largest total size of distinct tensor storages alive at once, not counting the
    arguments (parameters and inputs): the peak *extra* memory of eager execution of the graph (what
    ``GraphModule`` code does too: it drops each value after its last use). Deterministic, so it suits tests.
    """
    arg_ptrs = set()
    _nbytes(list(args), arg_ptrs)
    last_use: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        for a in n.all_input_nodes:
            last_use[a] = n
    env: dict[fx.Node, Any] = {}
    it = iter(args)
    peak = 0
    out = None

    def live() -> int:
        seen = set(arg_ptrs)
        return sum(_nbytes(v, seen) for v in env.values())

    with torch.no_grad():
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                env[n] = next(it)
            elif n.op == "call_function":
                a = fx.node.map_arg(n.args, lambda x: env[x])
                k = fx.node.map_arg(n.kwargs, lambda x: env[x])
                env[n] = n.target(*a, **k)
            elif n.op == "get_attr":
                env[n] = getattr(gm, n.target)
            elif n.op == "output":
                out = fx.node.map_arg(n.args[0], lambda x: env[x])
            else:
                raise ValueError(f"peak_live_bytes: unsupported node {n.op} {n.name}")
            peak = max(peak, live())
            for a in n.all_input_nodes:
                if last_use.get(a) is n:
                    env.pop(a, None)
            if n not in last_use and n.op != "output":
                env.pop(n, None)
    return peak, out
