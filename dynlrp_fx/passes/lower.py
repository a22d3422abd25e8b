"""Lowering: turn the paired graph into a graph of ATen ops only.

Rules call Python helpers and ``torch.func.vjp``; tracing them with ``make_fx`` over the exported program's fake
tensors (whose batch size is a symbol) records the ATen ops they run, including PyTorch's derivative formulas,
and keeps the batch dimension symbolic. The result has no Python rule code left: it is what ``torch.compile``
fuses and what ``torch.export`` saves.

Only what is not ATen yet is traced. The forward half (and the sums, recomputations and other ATen ops that
``pair`` and ``resolve_promises`` emit) already is: an ATen op that ``make_fx`` records as itself is copied
unchanged. Every other node (a relevance op, a ledger entry, a seed helper, and ATen ops that ``make_fx``
decomposes: the CompositeImplicit ``reshape``, ``scaled_dot_product_attention``) is traced *alone* on its
operands' fake values and its ATen subgraph is inlined. Tracing a node alone records the same ops as tracing it
inside the whole graph, since a trace sees only the fake values (shapes, strides, dtypes) the node receives. So
nodes that call the same code on operands of the same metadata (the layers of a transformer) share one trace: the
first one's subgraph is *stamped* for the others (:func:`_trace_key`). Sizes are symbolic ints; each distinct size
expression gets one node (the first that computed it), as in a whole-graph trace.

``make_fx`` decomposes ``reshape`` into ``view`` for the strides of the fake inputs it traces with (contiguous
ones). Those views are rewritten back to ``reshape`` (:func:`~.canonicalize.views_to_reshape`), so that the program,
and the file ``torch.export`` saves from it (export keeps ``reshape``), run on inputs and weights of any strides:
``channels_last``, transposed, sliced or expanded. On a viewable tensor ``reshape`` is that view.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .canonicalize import views_to_reshape
from .nodes import RECOMPUTED_FROM, is_recomputed, lazy_graph_module, size_key

__all__ = ["lower", "trace_node", "traced_value"]

if TYPE_CHECKING:
    from .pipeline import CompileContext


def lower(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Lower ``gm`` (on the fake values of its nodes: the exported program's fake mode, with a symbolic batch) to a
    pure ATen graph whose reshapes hold for inputs of any strides (see module doc). Reuses the traces ``pair``
    made (``ctx.traces``). A graph with data-dependent sizes (unbacked symbols, as SigLIP2's patch masks make) is
    traced whole instead: a node traced alone cannot see where such a symbol was defined."""
    if _has_unbacked_sizes(gm):
        fake_args = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
        with torch.no_grad():
            lowered = make_fx(gm, tracing_mode="symbolic", _allow_non_fake_inputs=False)(*fake_args)
    else:
        lowered = _Lowering(gm, ctx.traces).run()
    views_to_reshape(lowered)
    lowered.recompile()  # lazy: the code is generated when the final program first runs
    return lowered


def _has_unbacked_sizes(gm: fx.GraphModule) -> bool:
    """Whether any value of ``gm`` has a size that depends on data (an unbacked symbol such as ``u4``)."""
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, (torch.Tensor, torch.SymInt, tuple, list)) and free_unbacked_symbols(v):
            return True
    return False


_COMPOSITE: dict[Any, bool] = {}  # OpOverload -> make_fx decomposes it (a CompositeImplicitAutograd kernel)


def _kept(target: Any) -> bool:
    """Whether ``make_fx`` records a call of ``target`` as itself: ATen ops without a CompositeImplicit kernel,
    and sym-int arithmetic (``operator.mul`` on sizes)."""
    if isinstance(target, torch._ops.OpOverload):
        if target not in _COMPOSITE:
            _COMPOSITE[target] = torch._C._dispatch_has_kernel_for_dispatch_key(
                target.name(), "CompositeImplicitAutograd"
            )
        return not _COMPOSITE[target]
    return getattr(target, "__module__", None) in ("_operator", "operator")


def _meta(val: Any, known: dict | None = None) -> dict:
    """The node meta ``make_fx`` records: the fake value and, for a tensor, its metadata (taken from ``known``, the
    meta of the node copied, when it has them for this value: computing them evaluates symbolic strides)."""
    meta = {"val": val}
    if isinstance(val, torch.Tensor) and not val.is_sparse:
        if known is not None and known.get("val") is val and "tensor_meta" in known:
            meta["tensor_meta"] = known["tensor_meta"]
        else:
            meta["tensor_meta"] = _extract_tensor_metadata(val)
    return meta


def _freeze(obj: Any) -> Any:
    """A hashable, value-comparing form of a node's constant arguments and of a relevance op's configuration
    (rules by identity: one rule object runs the same code); raises ``TypeError`` for anything else."""
    if isinstance(obj, (float, complex)):
        return (type(obj), repr(obj))  # -0.0 == 0.0, but a trace may bake either in
    if obj is None or isinstance(obj, (bool, int, str, torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return (type(obj), obj)
    if isinstance(obj, (list, tuple)):
        return (type(obj), tuple(_freeze(x) for x in obj))
    if isinstance(obj, dict):
        return (dict, tuple(sorted((repr(k), _freeze(v)) for k, v in obj.items())))
    if isinstance(obj, (set, frozenset)):
        return (frozenset, frozenset(_freeze(x) for x in obj))
    if isinstance(obj, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) or callable(obj) and hasattr(obj, "__code__"):
        return ("id", id(obj))
    raise TypeError(f"no trace key for {type(obj).__name__}")


def _callable_key(fn: Any) -> Any:
    """The trace key of a node's target: plain functions and ops by identity; a relevance op or ledger entry (a
    fresh object per node) by its class and its configuration, without its node name (used in messages only)."""
    if hasattr(fn, "__code__") or isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return ("id", id(fn))
    state = {k: v for k, v in vars(fn).items() if k not in ("node_name", "__name__", "__qualname__", "__module__")}
    rule = state.pop("rule", None)
    return (type(fn), id(rule), _freeze({k: _template_key(v) for k, v in state.items()}))


def _template_key(v: Any) -> Any:
    """A relevance op's argument templates hold ``_Ref`` markers (operand positions): compared by position."""
    if hasattr(v, "__slots__") and type(v).__name__ == "_Ref":
        return ("ref", v.i)
    if isinstance(v, (list, tuple)):
        return type(v)(_template_key(x) for x in v)
    if isinstance(v, dict):
        return {k: _template_key(x) for k, x in v.items()}
    return v


def _traced_value(v: Any) -> bool:
    """Whether a trace takes ``v`` as an input (a tensor or a symbolic size), rather than as a constant."""
    return isinstance(v, (torch.Tensor, torch.SymInt))


def _element(v: Any, i: int | None) -> Any:
    """``v``, or its element ``i`` (one output of a multi-output op)."""
    return v if i is None else v[i]


def _value_key(v: Any) -> Any:
    """What a trace sees of an operand: a tensor's shape, strides, offset, dtype and device (sizes as
    expressions in the batch symbol), a sym-int's expression."""
    if isinstance(v, torch.Tensor):
        if getattr(v, "constant", None) is not None:
            # a fake tensor that knows its value (a small lifted constant): a trace may fold that value in
            raise TypeError("a fake value with a known constant")
        return ("T", tuple(map(size_key, v.shape)), tuple(map(size_key, v.stride())),
                size_key(v.storage_offset()), v.dtype, v.device, v.requires_grad, v.layout)
    if isinstance(v, torch.SymInt):
        return ("S", size_key(v))
    raise TypeError(f"no trace key for {type(v).__name__}")


def _trace_inputs(n: fx.Node) -> tuple[list[tuple[fx.Node, int | None]], dict[fx.Node, Any]]:
    """The inputs of ``n``'s trace: ``(operand, None)`` for each operand holding a tensor or sym-int, ``(operand,
    i)`` for each one in a multi-output op's tuple; and the operands whose value is a Python constant (a size torch
    specialised), which the trace bakes in, as a whole-graph trace does."""
    inputs: list[tuple[fx.Node, int | None]] = []
    consts: dict[fx.Node, Any] = {}
    for o in n.all_input_nodes:
        v = o.meta.get("val")
        if _traced_value(v):
            inputs.append((o, None))
        elif isinstance(v, (tuple, list)) and any(_traced_value(x) for x in v):
            if not all(x is None or _traced_value(x) for x in v):
                raise NotImplementedError(f"lower: operand {o.name} of {n.name} mixes tensors and constants")
            inputs.extend((o, i) for i, x in enumerate(v) if x is not None)
        else:
            consts[o] = v
    return inputs, consts


def _trace_key(n: fx.Node, inputs: list, consts: dict) -> Any:
    """What a trace of ``n`` depends on: its target (a relevance op by rule and configuration), its constant
    arguments, where each operand goes, the metadata of each input and the constants' values. Nodes with equal
    keys trace to the same ops. ``None`` when something has no key (the node is then traced on its own)."""
    operands = n.all_input_nodes
    try:
        return (
            _callable_key(n.target),
            _freeze(fx.node.map_arg((n.args, n.kwargs), lambda o: ("in", operands.index(o)))),
            tuple((operands.index(o), i, _value_key(_element(o.meta["val"], i))) for o, i in inputs),
            _freeze(tuple(consts.get(o) for o in operands)),
        )
    except TypeError:
        return None


def _trace(n: fx.Node, inputs: list, consts: dict) -> fx.GraphModule:
    """``make_fx`` of ``n``'s call on its inputs' fake values (each input a placeholder, in order)."""

    def call(*xs):
        sub = dict(consts)
        for (o, i), x in zip(inputs, xs):
            if i is None:
                sub[o] = x
            else:  # rebuild the tuple of a multi-output op (its ``None`` entries stay)
                sub.setdefault(o, list(o.meta["val"]))[i] = x
        sub = {o: tuple(v) if isinstance(v, list) and isinstance(o.meta["val"], tuple) else v for o, v in sub.items()}
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), sub.__getitem__)
        return n.target(*args, **kwargs)

    fakes = []
    seen: set[int] = set()
    for o, i in inputs:
        v = _element(o.meta["val"], i)
        if isinstance(v, torch.Tensor) and id(v) in seen:
            # two nodes share one fake value (a recomputed copy keeps its original's meta): the trace must see two
            # tensors, as a whole-graph trace does
            with v.fake_mode:
                v = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
        seen.add(id(v))
        fakes.append(v)
    with torch.no_grad():
        return make_fx(call, tracing_mode="symbolic", _allow_non_fake_inputs=False)(*fakes)


def trace_node(n: fx.Node, traces: dict) -> tuple[fx.GraphModule, list[tuple[fx.Node, int | None]]]:
    """The ATen subgraph of a call that is not ATen yet (see module doc), from ``traces`` (trace key -> traced
    graph, filled in here) when a node with the same key was traced before; and the operands (with the element of a
    multi-output op's tuple, or ``None``) that its placeholders stand for, in order."""
    inputs, consts = _trace_inputs(n)
    key = _trace_key(n, inputs, consts)
    traced = traces.get(key) if key is not None else None
    if traced is None:
        traced = _trace(n, inputs, consts)
        if key is not None:
            traces[key] = traced
    return traced, inputs


def traced_value(traced: fx.GraphModule, vals: list) -> Any:
    """The fake value of a traced call whose placeholders hold ``vals``: its outputs' fake values."""
    env = dict(zip((t for t in traced.graph.nodes if t.op == "placeholder"), vals))
    out = next(t for t in reversed(traced.graph.nodes) if t.op == "output").args[0]
    out = fx.node.map_arg(out, lambda t: env[t] if t in env else t.meta["val"])
    return tuple(out) if isinstance(out, list) else out


class _Lowering:
    """One :func:`lower` run: the new graph, the map from old nodes to new ones (``env``; a traced node maps to the
    structure of its outputs), the traces by key, the node of each size expression and of each output of a
    multi-output op, and the constants the traces made."""

    def __init__(self, gm: fx.GraphModule, traces: dict):
        self.gm = gm
        self.g = fx.Graph()
        self.root = torch.nn.Module()
        self.env: dict[fx.Node, Any] = {}
        self.by_name = {n.name: n for n in gm.graph.nodes}
        self.traces = traces
        self.sizes: dict[Any, fx.Node] = {}  # size expression -> the first node computing it
        self.items: dict[tuple[fx.Node, int], fx.Node] = {}  # (multi-output node, index) -> its getitem node
        self.constants: dict[tuple[int, str], str] = {}  # (trace, its constant's attribute) -> attribute here

    def run(self) -> fx.GraphModule:
        i = 0
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                # named as a whole-graph make_fx trace names them
                self.env[n] = self.g.placeholder(f"arg{i}_1")
                self.env[n].meta = _meta(n.meta["val"], n.meta)
                i += 1
            elif n.op == "output":
                self.g.output(fx.node.map_arg(n.args[0], self.env.__getitem__))
            elif n.op == "call_function" and n.target is operator.getitem and isinstance(self.env[n.args[0]], tuple):
                self.env[n] = self.env[n.args[0]][n.args[1]]  # one output of a traced node
            elif n.op == "call_function" and _kept(n.target):
                self.env[n] = self.copy(n)
            elif n.op == "call_function":
                self.env[n] = self.inline(n)
            else:  # a get_attr (an exported graph's submodule): not supported, a compiler bug rather than a user error
                raise NotImplementedError(f"lower: unexpected {n.op} node {n.name}")
        return lazy_graph_module(self.root, self.g)  # the passes after lower rewrite it before it first runs

    def copy(self, n: fx.Node) -> fx.Node:
        """An op ``make_fx`` records as itself: the same call on the new nodes."""
        val = n.meta.get("val")
        if isinstance(val, torch.SymInt) and val.node.expr in self.sizes:
            return self.sizes[val.node.expr]
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), self.env.__getitem__)
        if n.target is operator.getitem and isinstance(args[0], fx.Node) and (args[0], args[1]) in self.items:
            return self.items[(args[0], args[1])]
        new = self.g.call_function(n.target, args, kwargs)
        new.meta = _meta(val, n.meta)
        if is_recomputed(n):  # the multi-target split keeps rematerialised values with relevance
            # the original's name in the new graph (hold_small_outputs reads it; nodes may be renamed here)
            orig = self.env.get(self.by_name.get(n.meta[RECOMPUTED_FROM]))
            new.meta[RECOMPUTED_FROM] = orig.name if isinstance(orig, fx.Node) else n.meta[RECOMPUTED_FROM]
        if isinstance(val, torch.SymInt):
            self.sizes[val.node.expr] = new
        if n.target is operator.getitem and isinstance(args[0], fx.Node) and isinstance(args[1], int):
            self.items[(args[0], args[1])] = new
        return new

    def inline(self, n: fx.Node) -> Any:
        """Trace ``n`` alone (or reuse the trace of a node with the same key) and copy its ATen ops in."""
        traced, inputs = trace_node(n, self.traces)
        return self.stamp(traced, [self.element(o, i) for o, i in inputs])

    def element(self, o: fx.Node, i: int | None) -> Any:
        """The new node of operand ``o`` (of its element ``i``: one output of a multi-output op)."""
        new = self.env[o]
        if i is None or isinstance(new, tuple):
            return new if i is None else new[i]
        if (new, i) not in self.items:
            item = self.g.call_function(operator.getitem, (new, i))
            item.meta = _meta(o.meta["val"][i])
            self.items[(new, i)] = item
        return self.items[(new, i)]

    def stamp(self, traced: fx.GraphModule, inputs: list[Any]) -> Any:
        """Copy ``traced``'s nodes into the new graph with its placeholders bound to ``inputs``; returns its output
        structure in new nodes."""
        env: dict[fx.Node, Any] = {}
        it = iter(inputs)
        for t in traced.graph.nodes:
            if t.op == "placeholder":
                env[t] = next(it)
            elif t.op == "output":
                out = fx.node.map_arg(t.args[0], env.__getitem__)
                return tuple(out) if isinstance(out, list) else out
            elif t.op == "get_attr":  # a constant the rule made (shared by every stamp: nothing writes to it)
                key = (id(traced), t.target)
                if key not in self.constants:  # named in order of first use, as a whole-graph trace names them
                    self.constants[key] = f"_tensor_constant{len(self.constants)}"
                    setattr(self.root, self.constants[key], getattr(traced, t.target))
                env[t] = self.g.get_attr(self.constants[key])
                env[t].meta = dict(t.meta)
            else:
                val = t.meta.get("val")
                if isinstance(val, torch.SymInt) and val.node.expr in self.sizes:
                    env[t] = self.sizes[val.node.expr]
                    continue
                env[t] = self.g.node_copy(t, env.__getitem__)
                if isinstance(val, torch.SymInt):
                    self.sizes[val.node.expr] = env[t]
        raise AssertionError("traced graph without an output")
