"""Buffer reuse for eager execution: turn out-of-place pointwise ops into in-place ones where that is safe.

A compiled program gets buffer reuse from Inductor; a lowered graph run eagerly (``backend="eager"``) allocates a
fresh tensor for every op, so a chain such as the epsilon rule's ``R / (z + copysign(eps, z + 0.0))`` holds
several activation-sized temporaries at once. :func:`reuse_buffers` rewrites ``aten.add.Tensor(a, b)`` into
``aten.add_.Tensor(a, b)`` (and likewise for every pointwise op with an in-place twin) when writing into ``a`` is
unobservable:

* ``a`` owns its storage: it is the fresh output of an ATen op (no placeholder, parameter, constant or view of
  one, and nothing a non-ATen call has seen);
* this op is the last use of ``a`` *and* of every view of ``a``'s storage (graph outputs count as uses);
* no other operand of the op reads the same storage;
* the result has ``a``'s dtype, shape and strides, so later ops see the same tensor layout they were traced with.
* ``a`` and the result are both computed from the model's state alone, or neither is (``ctx.state_inputs``): values
  of the first kind are cut out and cached between calls by :mod:`dynlrp_fx.weight_cache`, which needs their
  buffers to be their own.

The rewrite only changes where results are written, never their values (tested bit for bit against the functional
graph). It is applied to a copy: the functional graph stays what :meth:`Explainer.graph` returns, exports and
``torch.compile`` consume (Inductor does its own buffer reuse, and functionalisation would undo this one).
"""

from __future__ import annotations

import functools
import operator
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from ..rules.table import returns_alias
from .nodes import size_key

__all__ = ["reuse_buffers", "inplace_variant", "out_variant"]

if TYPE_CHECKING:
    from .pipeline import CompileContext

_ESCAPED = object()  # storage that must never be written: inputs, parameters, or seen by non-ATen code


def _pointwise(op: object) -> bool:
    return (
        isinstance(op, torch._ops.OpOverload)
        and torch.Tag.pointwise in op.tags
        and not op._schema.is_mutable
        and torch.Tag.nondeterministic_seeded not in op.tags
    )


@functools.cache
def inplace_variant(op: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """The in-place twin of a functional pointwise ATen overload (``add.Tensor`` -> ``add_.Tensor``), or ``None``."""
    if not _pointwise(op):
        return None
    packet = getattr(torch.ops.aten, op._schema.name.split("::")[-1] + "_", None)
    if packet is None or op._overloadname not in packet.overloads():
        return None
    twin = getattr(packet, op._overloadname)
    if [a.name for a in twin._schema.arguments] != [a.name for a in op._schema.arguments]:
        return None
    return twin


@functools.cache
def out_variant(op: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """The ``out=`` overload of a functional pointwise ATen overload (``div.Tensor`` -> ``div.out``), or ``None``."""
    if not _pointwise(op):
        return None
    packet = getattr(torch.ops.aten, op._schema.name.split("::")[-1])
    want = [(a.name, str(a.type)) for a in op._schema.arguments]
    for name in packet.overloads():
        cand = getattr(packet, name)
        args = cand._schema.arguments
        if (
            len(args) == len(want) + 1
            and args[-1].name == "out"
            and args[-1].kwarg_only
            and args[-1].alias_info is not None
            and args[-1].alias_info.is_write
            and [(a.name, str(a.type)) for a in args[:-1]] == want
        ):
            return cand
    return None


def _holds_tensors(n: fx.Node) -> bool:
    v = n.meta.get("val")
    return isinstance(v, torch.Tensor) or (isinstance(v, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in v))


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.device == b.device
        and list(map(size_key, a.shape)) == list(map(size_key, b.shape))
        and list(map(size_key, a.stride())) == list(map(size_key, b.stride()))
    )


def reuse_buffers(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """A copy of ``gm`` with pointwise ops made in-place where unobservable (see module doc); the number of
    rewritten ops goes to ``ctx.buffer_rewrites``."""
    g = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = g.graph_copy(gm.graph, val_map)
    g.output(out)
    nodes = list(g.nodes)
    idx = {n: i for i, n in enumerate(nodes)}

    # storage owner of every tensor value: the node that allocated it, or _ESCAPED
    owner: dict[fx.Node, object] = {}
    items: dict[tuple, fx.Node] = {}  # (multi-output op, index) -> the first getitem of that output
    escaped: set = set()  # owners whose storage an opaque callable has seen
    for n in nodes:
        if n.op != "call_function" or not _holds_tensors(n):
            owner[n] = _ESCAPED
            continue
        op = n.target
        if isinstance(op, torch._ops.OpOverload):
            if returns_alias(op):  # views and in-place ops alias their first operand
                src = n.args[0] if n.args else None
                owner[n] = owner.get(src, _ESCAPED) if isinstance(src, fx.Node) else _ESCAPED
            else:
                owner[n] = n
        elif op is operator.getitem and isinstance(n.args[0], fx.Node):
            src = n.args[0]
            fresh = isinstance(src.target, torch._ops.OpOverload) and not returns_alias(src.target)
            # an output of a fresh multi-output op owns its storage; two getitems of it are one storage
            owner[n] = owner.get(items.setdefault((src, n.args[1]), n), n) if fresh else owner.get(src, _ESCAPED)
        else:  # sym-int arithmetic or an opaque callable: whatever tensors it sees may be kept by it
            owner[n] = _ESCAPED
            escaped.update(owner.get(a, _ESCAPED) for a in n.all_input_nodes)
    owner = {n: _ESCAPED if o in escaped else o for n, o in owner.items()}
    # the last position at which each storage is read (through any alias)
    last: dict[object, int] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            o = owner.get(a, _ESCAPED)
            if o is not _ESCAPED:
                last[o] = max(last.get(o, -1), idx[n])
    for n in nodes:
        o = owner.get(n)
        if o is not None and o is not _ESCAPED:
            last.setdefault(o, idx[n])

    # values computed from the state placeholders alone (see dynlrp_fx.weight_cache)
    state_only: set[fx.Node] = set()
    if ctx.state_inputs is not None:
        state_only.update([n for n in nodes if n.op == "placeholder"][: ctx.state_inputs])
        for n in nodes:
            if n.op == "call_function" and n.all_input_nodes and all(a in state_only for a in n.all_input_nodes):
                state_only.add(n)

    rewrites = 0
    redirect: dict[object, object] = {}  # a rewritten node's storage is its first operand's

    def find(o: object) -> object:
        while o in redirect:
            o = redirect[o]
        return o

    for n in nodes:
        if n.op != "call_function" or not _pointwise(n.target):
            continue
        vn = n.meta.get("val")
        if not isinstance(vn, torch.Tensor):
            continue
        for pos, a in enumerate(n.args):  # the first operand whose storage dies here and fits the result
            if not isinstance(a, fx.Node):
                continue
            o = find(owner.get(a, _ESCAPED))
            if o is _ESCAPED or last.get(o) != idx[n]:
                continue
            if any(u is not a and find(owner.get(u, _ESCAPED)) is o for u in n.all_input_nodes):
                continue
            if (o in state_only) != (n in state_only):
                continue
            va = a.meta.get("val")
            if not (isinstance(va, torch.Tensor) and _same_layout(va, vn)):
                continue
            twin = inplace_variant(n.target) if pos == 0 else None
            if twin is not None:
                n.target = twin
            else:
                twin = out_variant(n.target)
                if twin is None:
                    continue
                n.target = twin
                n.kwargs = {**n.kwargs, "out": a}
            redirect[n] = o
            last[o] = last.get(n, idx[n])
            rewrites += 1
            break
    ctx.buffer_rewrites = rewrites
    return fx.GraphModule(gm, g)
