"""Rows that only a ``select`` reads are the only rows computed.

A classifier on a transformer reads one token of the last layer: BERT's pooler and ViT's head take
``hidden[:, 0]``. Everything the last layer computes per token after its attention (the output projection's
bias, the residual adds, both LayerNorms, the whole MLP) is dead for the other ``T - 1`` tokens: the forward pass
computes it and the relevance sweep carries zeros through it (autograd does the same work in its backward pass).
:func:`narrow_dead_rows` moves such a ``select(x, d, i)`` towards the inputs, through ops that act on each index of
``d`` alone, so that they compute row ``i`` only:

* an identity ``slice`` (``x[:, :]``) is dropped;
* a pointwise op (``torch.Tag.pointwise``: ``add``, ``gelu``, ``where`` ...) selects each operand (index 0 of an
  operand broadcast along ``d``, nothing for one without ``d``);
* ``native_layer_norm`` normalising dims after ``d`` (its statistics are per row);
* a linear map on the last dim of a 3-D tensor, ``reshape(addmm(b, reshape(z, (B*T, H)), W), (B, T, O))`` (or
  ``mm``) with ``d = 1``: ``addmm(b, z[:, i], W)``.

A select moves through ``x`` only when the select is ``x``'s only user (after dead code is removed), so every
value that something else reads is kept whole; it stops at anything else (an attention op mixes the rows). The
forward values of the rows that remain are the same, and LRP gives a row that receives no relevance none to pass
on, so the explanation is the same (to the rounding of matrix products of another height). BERT-base at 128
tokens: the last layer's MLP and output projection run on one row instead of 128 (about 6% of the matrix
products of the forward pass and of the sweep).

The narrowed nodes keep their module paths; ``meta["dynlrp_narrowed"]`` holds the shape they had, so that
``condition=`` can refuse a feature dim that no longer exists.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

__all__ = ["narrow_dead_rows"]

if TYPE_CHECKING:
    from .pipeline import CompileContext

_aten = torch.ops.aten
_LINEAR = (_aten.addmm.default, _aten.mm.default)


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _same_size(a: Any, b: Any) -> bool:
    return str(a) == str(b)


class _Narrowing:
    def __init__(self, gm: fx.GraphModule):
        self.g = gm.graph
        self.fake_mode = detect_fake_mode([_val(n) for n in self.g.nodes if isinstance(_val(n), torch.Tensor)])
        self.count = 0

    def emit(self, before: fx.Node, target: Any, args: tuple, like: fx.Node) -> fx.Node:
        """A new node ``target(*args)`` in front of ``before``, with ``like``'s metadata and its own fake value."""
        with self.g.inserting_before(before):
            node = self.g.call_function(target, args)
        node.meta = {k: v for k, v in like.meta.items() if k != "val"}
        fargs = fx.node.map_arg(args, _val)
        with self.fake_mode:
            node.meta["val"] = target(*fargs)
        return node

    def select(self, before: fx.Node, x: fx.Node, dim: int, index: int, like: fx.Node) -> fx.Node:
        """``select(x, dim, index)`` (a duplicate is merged by :meth:`merge_selects`)."""
        return self.emit(before, _aten.select.int, (x, dim, index), like)

    def merge_selects(self, s: fx.Node) -> fx.Node:
        """The first of the selects of ``s``'s input with ``s``'s arguments; the others are replaced by it (two
        operands of ops on one value, both narrowed, must leave that value one user to narrow further)."""
        x, d, i = s.args
        ndim = _val(x).ndim
        same = {u for u in x.users if u.target is _aten.select.int and u.args[0] is x
                and u.args[1] % ndim == d % ndim and u.args[2] == i}
        if len(same) == 1:
            return s
        first = x.next  # the earliest of them in graph order (users come after x)
        while first not in same:
            first = first.next
        for u in same - {first}:
            u.replace_all_uses_with(first)
            self.g.erase_node(u)
        return first

    def replace(self, s: fx.Node, new: fx.Node, narrowed: bool = True) -> None:
        """``new`` in place of the select ``s``; ``narrowed``: ``new`` computes one row of what ``s`` read (its
        whole shape goes into ``meta["dynlrp_narrowed"]``). What only ``s`` read is removed, with the dtype/device
        checks of a value that is no longer computed whole."""
        x = s.args[0]
        if narrowed:
            new.meta.setdefault("dynlrp_narrowed", tuple(_val(x).shape))
        for u in [u for u in x.users if u.target is _aten._assert_tensor_metadata.default]:
            self.g.erase_node(u)
        s.replace_all_uses_with(new)
        self.g.erase_node(s)
        self.g.eliminate_dead_code()
        self.count += 1

    def step(self, s: fx.Node) -> list[fx.Node] | None:
        """Move ``s = select(x, d, i)`` one op up; returns the new selects to move on (``None``: ``s`` stays)."""
        x, d, i = s.args
        if not isinstance(x, fx.Node) or x.op != "call_function":
            return None
        first = self.merge_selects(s)
        if first is not s:
            return [first]
        checks = [u for u in x.users if u.target is _aten._assert_tensor_metadata.default]
        v = _val(x)
        if len(x.users) - len(checks) != 1 or not isinstance(v, torch.Tensor) or not isinstance(i, int):
            return None
        d = d % v.ndim
        if d == 0:  # dim 0 is the batch: its rows are samples, which the rest of the compiler counts on
            return None
        if x.target is _aten.slice.Tensor:  # x[:, :] : the same rows
            y, sdim, start, end, step = list(x.args) + [None, 0, None, None, 1][len(x.args):]
            if start in (0, None) and step == 1 and (end is None or end >= 2**62) and sdim % v.ndim != d:
                new = self.select(s, y, d, i, s)
                self.replace(s, new, narrowed=False)
                return [new]
            return None
        if x.target is operator.getitem and x.args[1] == 0:
            ln = x.args[0]
            if (ln.target is _aten.native_layer_norm.default and len(ln.users) == 1
                    and d < _val(ln.args[0]).ndim - len(ln.args[1])):
                a = self.select(s, ln.args[0], d, i, ln)
                ln2 = self.emit(s, _aten.native_layer_norm.default, (a, *ln.args[1:]), ln)
                out = self.emit(s, x.target, (ln2, 0), x)
                self.replace(s, out)
                return [a]
            return None
        if x.target is _aten.reshape.default and d == 1 and v.ndim == 3:
            return self.linear(s, x, i)
        if isinstance(x.target, torch._ops.OpOverload) and torch.Tag.pointwise in x.target.tags:
            return self.pointwise(s, x, d, i)
        return None

    def pointwise(self, s: fx.Node, x: fx.Node, d: int, i: int) -> list[fx.Node] | None:
        v = _val(x)
        new_selects = []

        def narrow(a: Any) -> Any:
            av = _val(a)
            if not isinstance(av, torch.Tensor) or av.ndim == 0:
                return a
            ad = d - (v.ndim - av.ndim)
            if ad < 0:
                return a
            size = av.shape[ad]
            if isinstance(size, int) and size == 1 and not _same_size(v.shape[d], 1):
                return self.select(s, a, ad, 0, x)
            if not _same_size(size, v.shape[d]):
                raise _Stop
            sel = self.select(s, a, ad, i, x)
            new_selects.append(sel)
            return sel

        if x.kwargs:
            return None
        try:
            args = fx.node.map_arg(x.args, narrow)
        except _Stop:
            return None
        self.replace(s, self.emit(s, x.target, args, x))
        return new_selects

    def linear(self, s: fx.Node, x: fx.Node, i: int) -> list[fx.Node] | None:
        """``select(reshape(addmm(b, reshape(z, (B*T, H)), W), (B, T, O)), 1, i)`` -> ``addmm(b, z[:, i], W)``."""
        mm = x.args[0]
        if not isinstance(mm, fx.Node) or mm.target not in _LINEAR or len(mm.users) != 1:
            return None
        pos = 1 if mm.target is _aten.addmm.default else 0
        flat = mm.args[pos]
        if mm.kwargs or not isinstance(flat, fx.Node) or flat.target is not _aten.reshape.default:
            return None
        z = flat.args[0]
        zv, v = _val(z), _val(x)
        if not isinstance(zv, torch.Tensor) or zv.ndim != 3:
            return None
        if not (_same_size(zv.shape[0], v.shape[0]) and _same_size(zv.shape[1], v.shape[1])):
            return None
        a = self.select(s, z, 1, i, flat)
        args = list(mm.args)
        args[pos] = a
        self.replace(s, self.emit(s, mm.target, tuple(args), mm))
        return [a]


class _Stop(Exception):
    pass


def narrow_dead_rows(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Move every ``select`` of a value nothing else reads towards the inputs (see the module doc); returns
    ``gm``."""
    del ctx  # reads nothing from the context (whether it runs: CompileContext.narrow_rows)
    work = _Narrowing(gm)
    if work.fake_mode is None:
        return gm
    todo = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _aten.select.int]
    while todo:
        s = todo.pop()
        if getattr(s, "_erased", False):
            continue
        more = work.step(s)
        if more:
            todo.extend(more)
    if work.count:
        gm.graph.eliminate_dead_code()  # selects made for an op that then stayed whole
        gm.graph.lint()
        gm.recompile()
    return gm
