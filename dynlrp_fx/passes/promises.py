"""Promise resolution: bind every promise node to the forward value it names (a memory policy).

DynamicLRP recovers forward values that autograd did not save at run time ("promises"). Here the complete
forward graph is available, so a promise is a node of the relevance half naming a forward value, and this pass
binds it at compile time. Two policies:

``keep``
    Bind each promise to the forward value itself: the value stays alive from the forward op that made it until
    the last relevance op that reads it.
``recompute``
    Rematerialise *cheap* forward values (pointwise ops such as ``relu``, ``gelu``, ``add``, ``mul``, dtype casts,
    and view-like ops) in the relevance half, right before their first relevance use, when every tensor operand is
    a graph input (parameters, user inputs) or another promised value (which the relevance half holds anyway).
    The forward copy then dies as soon as the forward pass is done with it. Example: in ``conv -> relu -> conv`` the
    first conv's output ``z`` is promised (its rule needs it) and so is ``relu(z)`` (the second conv's input);
    with ``recompute`` only ``z`` is held across the turn from forward to relevance, and ``relu(z)`` is recomputed
    from it, which costs one pointwise kernel and saves one activation per layer.

Why a rule rather than a min-cut: AOTAutograd's min-cut partitioner (``min_cut_rematerialization_partition``)
needs the graph split into a forward and a backward part by ``tangents_*`` dependence; our relevance half depends
on the forward output through the seed, and DESIGN.md section 4 measured min-cut at -35% memory on a small Llama but
+66% on a CNN. The rule above never extends the lifetime of any value (recomputations read only values that are
alive in the relevance half anyway), so it cannot raise peak memory in eager execution except by the transient
recomputed value itself; :func:`peak_live_bytes` measures the effect (see ``tests/test_memory_policy.py`` and the
benchmark tables under ``benchmarks/results``).

``recompute`` is the default: on an H200 (``benchmarks/results/NVIDIA_H200.md``, batch 16) it lowered the peak
extra memory by 24% (VGG16), 36% (ViT-B/16) and 37% (BERT-base) for 0-5% more time; ``keep`` remains available.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from .pair import promise

__all__ = ["resolve_promises", "count_promises", "peak_live_bytes", "POLICIES", "DEFAULT_POLICY"]

POLICIES = ("keep", "recompute")
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
    # inference batch norm is a per-channel affine map (its other two outputs are empty): recomputing it from the
    # convolution output that the relevance half holds anyway saves one activation per conv-bn layer (ResNets)
    _aten._native_batch_norm_legit_no_training.default,
}


def count_promises(gm: fx.GraphModule) -> int:
    """Number of unresolved promise nodes."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is promise)


def _is_cheap(node: fx.Node) -> bool:
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
    recompute: set[fx.Node] = set()
    if policy == "recompute":
        promised = {p.meta["promise_of"] for p in promises}
        order = {n: i for i, n in enumerate(g.nodes)}
        def recomputable(v: fx.Node) -> bool:
            return _is_cheap(v) and all(u.op == "placeholder" or u in promised for u in _tensor_inputs(v))

        for v in sorted(promised, key=order.__getitem__):  # topological: inputs are decided first
            if v.op == "call_function" and v.target is operator.getitem:  # one output of a cheap multi-output op
                src = v.args[0]
                if isinstance(src, fx.Node) and recomputable(src):
                    recompute.update((src, v))
            elif recomputable(v):
                recompute.add(v)
    copies: dict[fx.Node, fx.Node] = {}

    def materialize(v: fx.Node, before: fx.Node) -> fx.Node:
        if v not in recompute:
            return v
        if v in copies:
            return copies[v]
        for u in _tensor_inputs(v):
            materialize(u, before)
        with g.inserting_before(before):
            c = g.node_copy(v, lambda a: copies.get(a, a))
        c.meta = dict(v.meta)
        c.meta["dynlrp_recomputed_from"] = v.name
        copies[v] = c
        return c

    for p in promises:  # graph order: a copy is created at its first use and dominates all later ones
        target = materialize(p.meta["promise_of"], p)
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
