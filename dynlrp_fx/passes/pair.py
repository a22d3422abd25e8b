r"""The pairing pass: forward graph -> one graph computing the forward values *and* the relevance of the inputs.

The forward nodes are copied unchanged. Then a reverse sweep visits every node that received relevance and
emits its *relevance op*: a ``call_function`` node whose target is a :class:`RelevanceOp` (the node's rule bound
to the op) taking the output relevance and *promise* nodes. A promise names a forward value that the rule needs
(an operand or the output); :func:`~dynlrp_fx.passes.resolve_promises.resolve_promises` later binds each to the kept
forward value or a recomputation. Relevance arriving at a value from several users (fan-out) is summed.

Rules that are not exactly conservative get a *ledger* node computing, per sample, what the op absorbed
(``sum R_out - sum R_in``: biases, stabilisers, masks), so that an explanation reports
``seed == sum(input relevance) + absorbed``.

The graph returns ``(output, seed_total, absorbed, *input_relevance, *param_relevance, *captured_relevance)``.

**Several outputs** (``output=["start_logits", "end_logits"]``): each explained output gets its own seed and the
seeds enter the same reverse sweep (LRP is linear in the seed, so one sweep gives the sum of the single-output
explanations); the graph returns every explained output in front of ``seed_total``, which is the sum of their
seeds. The target placeholder is then ``(B, K)`` (column ``k``: the target of output ``k``) and the seed
placeholder ``(B, n_1 + ... + n_K)`` (each output's per-sample seed, flattened, side by side).

**Outputs without a batch dimension** (``traced.output_batched`` false: a 0-d score or loss, an output over the
nodes of a graph, a ``chunk`` along dimension 0) are explained as one sample per call: the target is ``(1,)`` (an
index into the flattened output), and the seed total and the ledger are ``(1,)`` totals of the whole call.

Parameter relevance (``params=``) is a *separate* quantity that leaves the input relevance untouched: for every
op that receives relevance ``R`` and takes a chosen parameter ``W`` (directly or through route ops such as the
``permute`` of a decomposed ``nn.Linear``) as a non-data operand, the pass emits an extra relevance op

.. math::  R_W = W \odot J_W^\top \frac{R}{\mathrm{stab}(z)}

(the z-rule with the parameter in the place of the data operand, ``z`` the op's full output, epsilon taken from
the node's rule: LRP-0 stays exact), or ``R_W = J_W^T R`` for route and embedding ops (a class token
concatenated to the sequence, embedding rows). Route ops between the parameter and its user pass it back with
their VJP; a parameter used several times sums its shares. The VJP with respect to a weight contracts the batch
dimension, so ``R_W`` has the parameter's shape and is summed over the batch. For a bias-free linear op under
LRP-0, ``sum(R_W) == sum(R_x) == sum(R)``: every product ``x_j W_ij`` is counted once on each side; a bias
receives exactly the share it absorbed. Ops of other classes (softmax, attention, normalisers, activations)
give their parameters nothing.

Captured relevance (``capture=``) is the accumulated relevance of chosen forward nodes (module outputs), read
when the reverse sweep reaches them, i.e. after every user has contributed.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from ..rules.base import RuleContext, safe_divide
from ..rules.core import Epsilon, Route
from ..rules.table import facts, lookup
from .lower import trace_node, traced_value
from .nodes import FLOAT, INDEX, lazy_graph_module, tensor_slots

__all__ = [
    "pair", "RelevanceOp", "LedgerOp", "promise", "ProgramOutputs", "seed_from_target", "seed_given", "target_value",
    "seed_from_target_call", "call_total", "target_column", "seed_part",
]

if TYPE_CHECKING:
    from .pipeline import CompileContext


def promise() -> Any:
    """Placeholder target of a promise node; must be bound by ``resolve_promises`` before the graph runs."""
    raise RuntimeError("dynlrp: unresolved promise node (the resolve_promises pass binds every promise)")


class _Ref:
    __slots__ = ("i",)

    def __init__(self, i: int):
        self.i = i

    def __repr__(self) -> str:
        return f"_Ref({self.i})"


def _template(obj: Any, refs: list) -> Any:
    if isinstance(obj, fx.Node):
        refs.append(obj)
        return _Ref(len(refs) - 1)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_template(x, refs) for x in obj)
    if isinstance(obj, dict):
        return {k: _template(v, refs) for k, v in obj.items()}
    return obj


def _fill(obj: Any, vals: tuple) -> Any:
    if isinstance(obj, _Ref):
        return vals[obj.i]
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill(x, vals) for x in obj)
    if isinstance(obj, dict):
        return {k: _fill(v, vals) for k, v in obj.items()}
    return obj


_LOW = (torch.float16, torch.bfloat16)
#: route ops whose output holds the operand's elements in the same row-major order (a one-hot seed stays one-hot at
#: the same storage positions through them)
_ROW_MAJOR_VIEWS = frozenset({torch.ops.aten.view.default, torch.ops.aten.reshape.default,
                              torch.ops.aten._unsafe_view.default, torch.ops.aten.alias.default,
                              torch.ops.aten.clone.default})
_EMPTY_OPS = frozenset({torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default,
                        torch.ops.aten.empty_strided.default, torch.ops.aten.new_empty.default,
                        torch.ops.aten.new_empty_strided.default})


def _fp32(obj: Any) -> Any:
    """float16/bfloat16 tensors (also inside tuples/lists) as float32; anything else unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.dtype in _LOW else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_fp32(x) for x in obj)
    return obj


def _merge(base: Any, other: Any, out: Any, convert) -> Any:
    """``base + convert(other, out)`` per output (``None`` entries: nothing arrived), for one output or a tuple."""
    if other is None:
        return base
    if isinstance(other, tuple):
        base = base if base is not None else (None,) * len(other)
        return tuple(_merge(b, o, v, convert) for b, o, v in zip(base, other, out))
    c = convert(other, out)
    return c if base is None else base + c


def _to_relevance(g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return out.to(g.dtype) * g


def _to_relevance_masked(g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """:func:`_to_relevance` for a softmax's input, whose masked scores are ``-inf`` where ``G`` is ``0``."""
    r = out.to(g.dtype) * g
    return torch.where(g == 0, 0.0, r)


def _to_gradient(r: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return safe_divide(r, out.to(r.dtype), 0.0)


class RelevanceOp:
    """The relevance op paired with one forward op: ``(R, G, out, *operands) -> relevance per data slot``.

    ``R`` is relevance and ``G`` gradient-form relevance (``R = out * G``) that reached the output (either may be
    ``None``; tuples for multi-output ops). With ``gradient=True`` the op runs the rule's gradient form on
    ``G + R / out`` and returns ``G`` per slot, else the rule on ``R + out * G`` and returns relevance."""

    def __init__(self, rule, op, args_t, kwargs_t, slots, factors, extra, node_name: str, gradient: bool = False,
                 absorbed: bool = False, masked: bool = False):
        self.rule = rule
        self.masked = bool(masked)  #: the output feeds a softmax: converting G to relevance guards -inf * 0
        self.gradient = bool(gradient)
        self.absorbed = bool(absorbed)  #: also return what the gradient form absorbed, per output element
        self.op = op
        self.args_t = args_t
        self.kwargs_t = kwargs_t
        self.slots = list(slots)
        self.factors = list(factors)
        self.extra = dict(extra)
        self.node_name = node_name
        self.__name__ = f"relevance_{getattr(op, '_opname', 'op')}"
        self.__qualname__ = self.__name__
        self.__module__ = __name__

    def __call__(self, R, G, out, *vals):
        # relevance is computed in float32 for float16/bfloat16 models (stabilisers vanish in half precision)
        R, G, out, vals = _fp32(R), _fp32(G), _fp32(out), _fp32(vals)
        args = _fill(self.args_t, vals)
        kwargs = _fill(self.kwargs_t, vals)
        if self.gradient:
            ctx = RuleContext(self.op, args, kwargs, out, _merge(G, R, out, _to_gradient), self.slots, self.factors,
                              self.extra)
            if self.absorbed:
                res, absorbed = self.rule.gradient_and_absorbed(ctx)
                return (*res, absorbed)
            res = self.rule.gradient(ctx)
        else:
            convert = _to_relevance_masked if self.masked else _to_relevance
            ctx = RuleContext(self.op, args, kwargs, out, _merge(R, G, out, convert), self.slots, self.factors,
                              self.extra)
            res = self.rule.relevance(ctx)
        if len(res) != len(self.slots):
            raise RuntimeError(
                f"rule {self.rule!r} returned {len(res)} relevances for {len(self.slots)} data operands of "
                f"{self.op} (node {self.node_name})"
            )
        return tuple(res)

    def __repr__(self) -> str:
        return f"RelevanceOp({self.op}, {self.rule!r})"


def _per_sample(t: torch.Tensor, bdim: Any, B) -> torch.Tensor:
    """Per-sample sums of ``t``; ``bdim`` is ``(dim, outer)``: the batch lies in ``dim`` with ``outer`` slower
    varying factors merged in front of it (``(T*B, E)`` has ``outer = T``), ``"sample"`` (``t`` holds them already),
    or ``None`` (spread evenly)."""
    t = t.to(torch.promote_types(t.dtype, torch.float32))
    if bdim == "sample":
        return t  # already per sample (an output-side ledger entry the rule summed)
    if bdim is None:
        return (t.sum() / B).expand(B).clone()  # a tensor of its own (ledger sums may be updated in place)
    d, outer = bdim if isinstance(bdim, tuple) else (bdim, 1)
    if outer == 1:
        # the other dims summed first, where the value lies (a reshape of the whole value to (B, -1) would copy a
        # permuted one: attention's q/k/v are (B, heads, T, d) views of (B, T, E)); the batch dim may hold B*T rows
        dims = [i for i in range(t.ndim) if i != d]
        return (t.sum(dims) if dims else t).reshape(B, -1).sum(1)
    t = t.movedim(d, 0)
    return t.reshape(outer, B, -1).sum((0, 2))


class LedgerOp:
    """Per-sample relevance absorbed by one op: ``sum R_out - sum_k R_k`` (batch positions fixed at compile time)."""

    def __init__(self, out_bdims: list, in_bdims: list, node_name: str):
        self.out_bdims = list(out_bdims)
        self.in_bdims = list(in_bdims)
        self.node_name = node_name
        self.__name__ = "ledger"
        self.__qualname__ = "ledger"
        self.__module__ = __name__

    def __call__(self, ref: torch.Tensor, routs: list, rins: list) -> torch.Tensor:
        B = ref.shape[0]
        total = None
        for r, d in zip(routs, self.out_bdims):
            t = _per_sample(_ledger_term(r), d, B).to(ref.dtype)
            total = t if total is None else total + t
        for r, d in zip(rins, self.in_bdims):
            t = _per_sample(_ledger_term(r), d, B).to(ref.dtype)
            total = -t if total is None else total - t
        return torch.zeros_like(ref) if total is None else total


def _is_float(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.dtype.is_floating_point


def _static_empty(v: Any) -> bool:
    """Whether ``v`` is a tensor with a static size 0 (a symbolic size is not compared: that would specialise it)."""
    return isinstance(v, torch.Tensor) and any(type(s) is int and s == 0 for s in v.shape)


def _ledger_term(entry: Any) -> torch.Tensor:
    """A ledger entry's relevance: a tensor, or ``(value, index or None, G, masked)`` for gradient-form relevance
    ``value * G`` (``masked``: ``0`` where ``G`` is, so that masked scores of ``-inf`` give ``0``, not NaN)."""
    if isinstance(entry, torch.Tensor):
        return entry
    value, index, g, masked = entry
    value = _fp32(value if index is None else value[index])
    return (_to_relevance_masked if masked else _to_relevance)(g, value)


def seed_from_target(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Relevance seed: the output value at the target index of each sample (``-1``: argmax), zero elsewhere."""
    return _fp32(y) * seed_gradient(y, target)  # float32 for half-precision models


def _target_index(flat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sample, the index into the flattened output ``flat`` that ``target`` names (``-1``: the argmax)."""
    return torch.where(target < 0, flat.argmax(1), target)


def seed_gradient(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The target seed in gradient form: ``1`` at the target index of each sample, so that ``y * G`` is
    :func:`seed_from_target`'s seed."""
    flat = y.reshape(y.shape[0], -1)
    idx = _target_index(flat, target)
    dtype = torch.promote_types(y.dtype, torch.float32)
    sizes = list(y.shape[1:])
    # comparisons with aranges, not scatter: Inductor's scatter lowering guards on batch >= 2. One arange per dim
    # of the output, compared with the target's coordinate in that dim, and the per-dim masks multiplied by
    # broadcasting: a language model's (B, T, V) logits then cost one pass, not an arange over all T * V positions
    # (int32 or int64: as many bytes as the logits or twice as many, enough to set an eager explanation's peak)
    mask = None
    rest = idx
    for d in reversed(range(len(sizes))):
        coord = rest % sizes[d] if d > 0 else rest
        rest = rest // sizes[d]
        view = [1] * (len(sizes) + 1)
        view[d + 1] = -1
        pos = torch.arange(sizes[d], device=y.device, dtype=idx.dtype).reshape(view)
        m = (pos == coord.reshape([-1] + [1] * len(sizes))).to(dtype)
        mask = m if mask is None else m * mask
    if mask is None:  # a (B,) output: each sample's only value
        return torch.ones_like(flat[:, 0], dtype=dtype).reshape(y.shape) * (idx == 0).to(dtype)
    return mask


def target_value(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sample, the output value at the target index (``-1``: argmax; float32 or wider): the total of
    :func:`seed_from_target`'s seed (the runtime checks that targets are in range)."""
    flat = y.reshape(y.shape[0], -1)
    return flat.gather(1, _target_index(flat, target).unsqueeze(1)).squeeze(1).to(torch.promote_types(y.dtype, torch.float32))


def seed_linear_pullback(y: torch.Tensor, target: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                         eps: float, absorbed: bool):
    """The epsilon rule's gradient form at ``mm(a, w)`` / ``addmm(bias, a, w)`` (``w``: ``(K, N)``) whose output is
    the explained ``y`` laid out row-major (``y`` its view, with ``N`` as its last dim) and whose ``G`` is
    :func:`seed_gradient`'s one-hot seed: ``G_a = s @ w^T`` has one non-zero row per sample, ``s_b * w[:, col_b]``
    at the target's row, so it is built from ``B`` columns of ``w`` instead of a dense ``(M, N) @ (N, K)`` product
    with one non-zero per sample (a language model's LM head: as costly as its forward pass).
    ``s_b = |z_b| / (|z_b| + eps)`` with ``z_b`` the target's value; what the rule absorbs, per sample, is
    ``eps * z_b / (|z_b| + eps) + s_b * bias[col_b]`` (:meth:`Epsilon.gradient_and_absorbed` with one non-zero
    ``G``). Returns ``(G_a,)`` or ``(G_a, absorbed)``."""
    flat = y.reshape(y.shape[0], -1)
    dtype = torch.promote_types(y.dtype, torch.float32)
    idx = _target_index(flat, target)
    n_cols = w.shape[1]
    rows = flat.shape[1] // n_cols  # rows of a per sample (y's last dim is N: each sample owns whole rows)
    row, col = idx // n_cols, idx % n_cols
    z = flat.gather(1, idx.unsqueeze(1)).squeeze(1).to(dtype)  # the linear op's output at the target
    if eps != 0:
        t = 1.0 / (z.abs() + eps)
        s = 1.0 - eps * t
    else:
        t, s = None, torch.ones_like(z)
    # (B, K): s_b * w[:, col_b], as rows of w^T: an LM head's w is the transposed (V, E) weight, and index_select
    # along dim 1 of a transposed view copies all of it first (150 ms for GPT-2's); cast after selecting
    picked = w.t().index_select(0, col).to(dtype) * s.unsqueeze(1)
    # the row within each sample by comparison with an arange over a sample's rows: no scatter (Inductor's scatter
    # lowering guards on the batch), and no arange over the batch (a value of the batch's size computed from sizes
    # alone would be repeated, not re-counted, when a multi-target sweep widens the batch)
    at_row = (torch.arange(rows, device=y.device, dtype=row.dtype).unsqueeze(0) == row.unsqueeze(1)).to(dtype)
    g_a = (at_row.unsqueeze(2) * picked.unsqueeze(1)).reshape(-1, picked.shape[1])
    if not absorbed:
        return (g_a,)
    total = eps * t * z if t is not None else torch.zeros_like(z)
    if bias is not None:
        total = total + s * bias.to(dtype).reshape(-1).expand(n_cols).index_select(0, col)
    return g_a, total


def seed_given(y: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """Relevance seed given explicitly (output-shaped), used as is."""
    return seed.to(torch.promote_types(y.dtype, torch.float32)).expand(y.shape)


def per_sample_total(r: torch.Tensor) -> torch.Tensor:
    """Sum over all but the first dimension (float32 or wider)."""
    return _per_sample(r, 0, r.shape[0])


def seed_from_target_call(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The seed of an output without a batch dimension, explained as one sample: ``target`` is ``(1,)``, an index
    into the flattened output (``-1``: argmax)."""
    return seed_from_target(y.reshape(1, -1), target).reshape(y.shape)


def call_total(r: torch.Tensor) -> torch.Tensor:
    """The total of a whole call's relevance as a ``(1,)`` tensor (float32 or wider): the ledger of an output
    without a batch dimension."""
    return r.to(torch.promote_types(r.dtype, torch.float32)).sum().reshape(1)


def target_column(target: torch.Tensor, k: int) -> torch.Tensor:
    """The targets of explained output ``k`` from the ``(B, K)`` target of a program with several outputs."""
    return target[:, k]


def seed_part(seed: torch.Tensor, k: int, *ys: torch.Tensor) -> torch.Tensor:
    """The seed of explained output ``k`` from the packed ``(B, n_1 + ... + n_K)`` seed of a program with several
    outputs ``ys`` (``n_j``: the entries of one sample of output ``j``), shaped like that output."""
    b = seed.shape[0]
    sizes = [y.numel() // b for y in ys]
    start = sum(sizes[:k])
    return seed[:, start : start + sizes[k]].reshape(ys[k].shape)


def _expr(s: Any) -> Any:
    return s.node.expr if isinstance(s, torch.SymInt) else s


def _batch_dim(val: Any, batch_symbol: Any, node: fx.Node | None = None, example_batch: int | None = None) -> tuple | None:
    """Where the batch lies in a value: ``(dim, outer)`` (see :func:`_per_sample`) or ``None``.

    An exact batch-sized dim wins. A dim that merges the batch with other dims (``(B*H, T, D)``, or MHA's
    ``(T*B, E)``) is resolved through the nearest ancestor of ``node`` with an exact batch dim: the dims in front
    of the batch there are the slower-varying ``outer`` factor.
    """
    if not isinstance(val, torch.Tensor) or val.ndim == 0:
        return None
    if batch_symbol is None:
        return (0, 1)
    for d, s in enumerate(val.shape):
        if _expr(s) == batch_symbol:
            return (d, 1)
    if not hasattr(batch_symbol, "free_symbols"):
        return None
    merged = [d for d, s in enumerate(val.shape) if isinstance(s, torch.SymInt) and batch_symbol in _expr(s).free_symbols]
    if not merged and example_batch and all(not isinstance(s, torch.SymInt) for s in val.shape):
        # the model's code specialised the batch size in this part of the graph (torchvision's Swin pads
        # and rolls with Python ints): locate the batch by its traced size
        exact = [d for d, s in enumerate(val.shape) if int(s) == example_batch]
        if exact:
            return (exact[0], 1)
        if int(val.shape[0]) % example_batch == 0 and node is not None:
            outer = _outer_factor(node, example_batch)
            return (0, outer) if outer is not None else None
        return None
    if len(merged) != 1:
        return None
    d = merged[0]
    outer = _outer_factor(node, batch_symbol) if node is not None else 1
    if outer is None:
        return None
    return (d, outer)


def _outer_factor(node: fx.Node, batch_symbol: Any, limit: int = 16) -> int | None:
    """Product of the (static) dims in front of the batch dim in the nearest ancestor where it is exact."""
    frontier = [node]
    seen = set()
    for _ in range(limit):
        nxt = []
        for n in frontier:
            for a in n.all_input_nodes:
                if a in seen:
                    continue
                seen.add(a)
                v = a.meta.get("val")
                if isinstance(v, torch.Tensor) and v.ndim > 0:
                    for p, s in enumerate(v.shape):
                        if _expr(s) == batch_symbol:
                            outer = 1
                            for q in v.shape[:p]:
                                if isinstance(q, torch.SymInt):
                                    return None
                                outer *= int(q)
                            return outer
                nxt.append(a)
        frontier = nxt
        if not frontier:
            break
    return None


@dataclass(frozen=True)
class Routed:
    """The feature "dim" of a ``condition=`` on a mixture-of-experts layer: its experts. The conditioned node is
    the layer's ``(N, k, H)`` top-k contributions (``N`` tokens, sample-major), ``index`` the node of the router's
    ``(N, k)`` expert ids, ``experts`` how many experts the layer has (see
    :func:`dynlrp_fx.program.routed_experts`)."""

    index: str
    experts: int


def _expert_onehot(ids: torch.Tensor, experts: int, dtype: torch.dtype) -> torch.Tensor:
    """``(N, k, E)``: 1 where slot ``(n, j)`` went to expert ``e``. A comparison with an arange, not a scatter
    (Inductor's scatter lowering guards on the batch size, see :func:`seed_gradient`)."""
    return (ids.unsqueeze(-1) == torch.arange(experts, device=ids.device)).to(dtype)


def mask_routed(r: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Relevance ``r`` at the ``(N, k, H)`` top-k contributions, each slot multiplied by its sample's mask value
    for the expert it went to (``mask``: ``(B, E)``; token ``n`` belongs to sample ``n // (N // B)``)."""
    b, e = mask.shape
    per_token = mask.unsqueeze(1).expand(b, ids.shape[0] // b, e).reshape(ids.shape[0], e)
    per_slot = (per_token.unsqueeze(1) * _expert_onehot(ids, e, mask.dtype)).sum(-1)
    return r * per_slot.unsqueeze(-1).to(r.dtype)


def routed_relevance(r: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``(B, E)``: the relevance reaching each expert's contributions per sample (``r``, ``mask``, ``ids`` as in
    :func:`mask_routed`; the mask gives the sizes)."""
    b, e = mask.shape
    per_slot = r.sum(-1)
    per_expert = (per_slot.unsqueeze(-1) * _expert_onehot(ids, e, per_slot.dtype)).sum(1)  # (N, E)
    return per_expert.reshape(b, ids.shape[0] // b, e).sum(1)


@dataclass
class ProgramOutputs:
    """What the outputs of a paired graph are: ``(*outputs, seed_total, absorbed, *inputs, *params, *captured)``."""

    input_names: list[str] = field(default_factory=list)  #: user inputs whose relevance is returned, in order
    unattributed: list[str] = field(default_factory=list)  #: nodes whose absorbed relevance has no sample
    param_names: list[str] = field(default_factory=list)  #: public names of the parameter relevances
    capture_names: list[str] = field(default_factory=list)  #: public names of the captured relevances
    #: names of the explained outputs the graph returns in front of ``seed_total`` (one entry, or none in files
    #: written before several outputs existed: a single output)
    output_names: list[str] = field(default_factory=list)
    #: conditioned module paths (``condition=``): their per-feature relevance before the mask follows the captures
    condition_names: list[str] = field(default_factory=list)


#: rule classes whose parameter operands get the route rule ``R_W = J_W^T R``
_PARAM_ROUTE = frozenset({"route", "embedding"})
#: rule classes whose parameter operands get the z-rule ``W * J_W^T(R / stab(z))``
_PARAM_Z = frozenset({"linear", "bilinear", "product", "layernorm"})


def _param_rule(ann) -> Any:
    """The rule that gives a parameter operand of an op of this node its relevance (``None``: no relevance)."""
    if ann.rule_class in _PARAM_ROUTE:
        return Route()
    if ann.rule_class in _PARAM_Z:
        eps = getattr(ann.rule, "epsilon", 1e-6)
        return Epsilon(float(eps) if isinstance(eps, (int, float)) else 1e-6)
    return None


def param_derived(nodes: list, param_nodes: set) -> set:
    """``param_nodes`` plus every non-data node computed from them by route ops only (permute, reshape...)."""
    derived = set(param_nodes)
    for n in nodes:
        if n.op != "call_function" or n.meta.get("dynlrp") is not None or n.target is operator.getitem:
            continue
        spec = lookup(n.target)
        if spec is not None and spec.kind == "route" and any(a in derived for _, a in tensor_slots(n)):
            derived.add(n)
    return derived


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, fx.Node) else n


def _ledger_node(entry: Any) -> fx.Node:
    """The node holding a ledger entry's shape: the relevance node, or the ``G`` of a gradient-form entry."""
    return entry[2] if isinstance(entry, tuple) else entry


def _operand_refs(n: fx.Node) -> list[fx.Node]:
    """The node's operand nodes in the order :meth:`_Pairing.operands` makes their promises."""
    refs: list[fx.Node] = []
    _template(n.args, refs)
    _template(dict(n.kwargs), refs)
    return refs


def _zero_at_zero(n: fx.Node) -> bool:
    """Whether elementwise op ``n`` maps ``0`` to ``0``, evaluated on a float32 zero (other tensor operands, or an
    op that fails on a 0-d tensor: ``False``)."""
    tensors = [a for a in n.all_input_nodes if isinstance(_val(a), torch.Tensor)]
    if len(tensors) != 1:
        return False
    zero = torch.zeros((), dtype=torch.float32)
    try:
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: zero if a is tensors[0] else _val(a))
        out = n.target(*args, **kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return isinstance(out, torch.Tensor) and bool((out == 0).all())
    except Exception:  # noqa: BLE001 - any failure only means "not known to keep zero"
        return False


def pair(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Build the forward+relevance graph (see module doc) for ``ctx.seed_mode`` (``"target"`` or ``"seed"``);
    returns a new graph module and sets ``ctx.outputs`` (:class:`ProgramOutputs`).

    ``ctx.params`` maps parameter placeholder names to the public names under which their relevance is returned;
    ``ctx.capture`` maps public names to the forward node names whose accumulated relevance is returned. Both add
    nothing to the graph when empty.
    """
    builder = _Pairing(gm, ctx)
    builder.copy_forward()
    builder.seed()
    for n in reversed(builder.nodes):
        builder.visit(n)
    ctx.outputs = builder.finish()
    return lazy_graph_module(gm, builder.g)  # rewritten by resolve_promises and traced by lower before any call


class _Pairing:
    """The state of one :func:`pair` run: the new graph, the forward copy (``env``), the relevance that has reached
    each forward value (``R``; ``RP`` for parameter relevance), the ledger entries and the captured relevances."""

    def __init__(self, gm: fx.GraphModule, ctx: CompileContext):
        traced = ctx.traced
        self.mode = ctx.seed_mode
        self.user_inputs = traced.user_inputs
        self.batch_symbol = traced.batch_symbol
        self.example_batch = next(
            (int(traced.example_flat[i].shape[0]) for u, i in zip(traced.user_inputs, traced.tensor_leaf_index)
             if u.batched),
            None,
        )
        self.nodes = list(gm.graph.nodes)
        #: placeholders of the model's parameters: an additive constant read from them is finite (a bias), unlike one
        #: computed in the graph (a mask of -inf), so its ledger share needs no guard against 0 * inf
        self.parameters = {name for name, kind, _ in traced.state_specs if kind == "PARAMETER"}
        self.fake_mode = torch._guards.detect_fake_mode(
            [n.meta["val"] for n in self.nodes if n.op == "placeholder" and "val" in n.meta]
        )
        graph_outs = next(n for n in self.nodes if n.op == "output").args[0]
        self.y_srcs = [graph_outs[i] for i in (traced.output_indices or [traced.output_index])]
        self.y_names = list(traced.explained_outputs or [traced.output_name])
        self.batched = traced.output_batched
        self.g = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.R: dict[fx.Node, Any] = {}  # single-output node -> relevance node; multi-output -> {index: node}
        #: relevance in gradient form (``R = value * G``), kept like ``R``; a value may hold both
        self.G: dict[fx.Node, Any] = {}
        #: gradient-form relevance nodes that are the target's one-hot seed, reshaped row-major only (views of the
        #: explained output): node -> (output value node, target node); read by :meth:`sparse_seed_pullback`
        self.onehot: dict[fx.Node, tuple] = {}
        # params= needs relevance at every op that takes a chosen parameter: the whole program keeps relevance form
        self.gradient_form = bool(getattr(ctx, "gradient_form", True)) and not ctx.params
        #: ``False``: no ledger entries (measuring the ledger's cost; ``absorbed`` is then 0)
        self.keep_ledger = bool(getattr(ctx, "ledger", True))
        self._uses_g: dict[fx.Node, bool] = {}
        #: inputs of softmax-class ops: their masked scores are -inf where the softmax's gradient form gives G = 0
        self.softmax_inputs = {
            a for n in self.nodes if getattr(n.meta.get("dynlrp"), "rule_class", None) == "softmax"
            for _, a in tensor_slots(n)
        }
        # values that may hold uninitialised memory: an empty() and what route ops make of it (a circular pad fills
        # an empty() tensor region by region); where nothing arrives (G = 0) their relevance is 0, not garbage * 0
        # (NaN when the garbage is), so they convert like softmax inputs
        self.masked_values = set(self.softmax_inputs)
        for n in self.nodes:
            if n.op != "call_function":
                continue
            spec = lookup(n.target) if isinstance(n.target, torch._ops.OpOverload) else None
            if n.target in _EMPTY_OPS or (
                spec is not None and spec.kind == "route" and any(a in self.masked_values for a in n.all_input_nodes)
            ):
                self.masked_values.add(n)
        self.RP: dict[fx.Node, fx.Node] = {}  # parameter-derived node -> parameter relevance node
        self.ledgers: list[fx.Node] = []
        self.unattributed: list[str] = []
        self.by_name = {n.name: n for n in self.nodes}
        self.param_order = [(self.by_name[ph], pub) for ph, pub in ctx.params.items()]
        self.derived = param_derived(self.nodes, {ph for ph, _ in self.param_order}) if self.param_order else set()
        self.capture = dict(ctx.capture)
        self.cap_of: dict[fx.Node, list[str]] = {}
        for pub, node_name in self.capture.items():
            self.cap_of.setdefault(self.by_name[node_name], []).append(pub)
        self.captured: dict[str, fx.Node] = {}
        self.traces = ctx.traces
        #: condition=: public path -> (node name, feature dim); node -> [(path, mask placeholder, dim)]
        self.conditions = dict(getattr(ctx, "conditions", {}) or {})
        self.cond_of: dict[fx.Node, list] = {}
        self.conditioned: dict[str, fx.Node] = {}

    # -- graph building -------------------------------------------------------------------------------------------
    def emit(self, fn, *args) -> fx.Node:
        """A ``call_function`` node with its fake value. An ATen op or a ``getitem`` runs on the fake values;
        anything else (rule code, ledger and seed helpers) is traced to ATen and gets the fake values of the trace's
        outputs: ``lower`` inlines that trace, and nodes whose trace key matches share it
        (:func:`~.lower.trace_node`)."""
        node = self.g.call_function(fn, tuple(args))
        if isinstance(fn, torch._ops.OpOverload) or fn is operator.getitem:
            fargs = [tuple(_val(x) for x in a) if isinstance(a, (list, tuple)) else _val(a) for a in args]
            with self.fake_mode:
                node.meta["val"] = fn(*fargs)
        else:
            traced, inputs = trace_node(node, self.traces)
            node.meta["val"] = traced_value(traced, [_val(o) if i is None else _val(o)[i] for o, i in inputs])
        return node

    def accumulate(self, store: dict, key: Any, rnode: fx.Node) -> None:
        """Relevance arriving at a value from several users (fan-out) is summed."""
        prev = store.get(key)
        store[key] = rnode if prev is None else self.emit(torch.ops.aten.add.Tensor, prev, rnode)

    def add(self, target: fx.Node, idx: int | None, rnode: fx.Node, gradient: bool = False) -> None:
        store = self.G if gradient else self.R
        if idx is None:
            self.accumulate(store, target, rnode)
        else:
            self.accumulate(store.setdefault(target, {}), idx, rnode)

    def uses_gradient(self, n: fx.Node) -> bool:
        """Whether ``n``'s relevance op runs its rule's gradient form: the rule has one here, the node and every
        operand it sends relevance to are float values (token ids take relevance), and nothing reads the relevance
        of ``n`` itself (``capture=``, ``condition=``)."""
        if n not in self._uses_g:
            ann = n.meta.get("dynlrp")
            ok = (
                self.gradient_form and n.op == "call_function" and ann is not None and ann.rule is not None
                and ann.status == FLOAT and n not in self.cap_of and n not in self.cond_of
            )
            if ok:
                # one dtype throughout: a cast that rounds (float64 -> float32 in Llama's RMSNorm, float32 -> half)
                # has y != x, so x * G would not be the y * G that arrived
                out = _val(n)
                dtype = (out[0] if isinstance(out, (tuple, list)) else out).dtype
                slot_nodes = dict(tensor_slots(n))
                ok = all(
                    slot in slot_nodes and getattr(slot_nodes[slot].meta.get("dynlrp"), "status", None) == FLOAT
                    and _val(slot_nodes[slot]).dtype == dtype
                    for slot in ann.slots
                ) and ann.rule.gradient_form(n.target, ann.slots, self.extra(n))
            self._uses_g[n] = ok
        return self._uses_g[n]

    def extra(self, n: fx.Node) -> dict:
        """The node's ``NodeAnn.extra`` for its rule, with ``zero_at_zero`` for elementwise ops (whether
        ``f(0) == 0``: the identity rule's gradient form is exact then)."""
        ann = n.meta["dynlrp"]
        if ann.rule_class != "identity":
            return ann.extra
        return {**ann.extra, "zero_at_zero": _zero_at_zero(n)}

    def promise_of(self, n: fx.Node) -> fx.Node:
        """A promise of forward value ``n`` (bound by ``resolve_promises``)."""
        p = self.g.call_function(promise, ())
        p.meta["promise_of"] = self.env[n]
        p.meta["val"] = _val(n)
        return p

    def materialize(self, n: fx.Node) -> None:
        """Turn the gradient-form relevance that reached single-output ``n`` into relevance (``n * G``)."""
        g = self.G.pop(n, None)
        if g is None:
            return
        if isinstance(g, dict):
            raise RuntimeError(f"internal: gradient-form relevance of multi-output node {n.name} read directly")
        value = self.env[n] if n.op == "placeholder" else self.promise_of(n)
        r = self.emit(_to_relevance_masked if n in self.masked_values else _to_relevance, g, value)
        self.accumulate(self.R, n, r)

    def copy_forward(self) -> None:
        """Placeholders (the forward's, then the target/seed), then every forward op, unchanged."""
        g, env = self.g, self.env
        for n in self.nodes:
            if n.op == "placeholder":
                env[n] = g.placeholder(n.name)
                env[n].meta = dict(n.meta)
        ys = [_val(y) for y in self.y_srcs]
        with self.fake_mode:
            b = ys[0].shape[0] if self.batched else 1
            if self.mode == "target":
                size = (b,) if len(ys) == 1 else (b, len(ys))
                seed_fake = torch.empty(size, dtype=torch.long, device=ys[0].device)
            elif len(ys) == 1:
                seed_fake = torch.empty_like(ys[0])
            else:
                dtype = torch.float32  # the widest of the outputs' dtypes, at least float32
                for y in ys:
                    dtype = torch.promote_types(dtype, y.dtype)
                seed_fake = torch.cat([torch.empty_like(y, dtype=dtype).reshape(b, -1) for y in ys], 1)
        self.seed_ph = g.placeholder("dynlrp_target" if self.mode == "target" else "dynlrp_seed")
        self.seed_ph.meta["val"] = seed_fake
        for i, (pub, (node_name, dim)) in enumerate(self.conditions.items()):
            # condition=: a (B, C) mask over the feature dim of a node, multiplied into the relevance reaching it
            n = self.by_name[node_name]
            v = _val(n)
            # (rows, C): the rows are the batch; a routed node (N, k, H) merges it with the tokens, so the mask
            # takes the explained output's batch
            rows, size = (b, dim.experts) if isinstance(dim, Routed) else (v.shape[0], v.shape[dim])
            with self.fake_mode:
                mask_fake = torch.empty((rows, size), dtype=torch.promote_types(v.dtype, torch.float32),
                                        device=v.device)
            ph = g.placeholder(f"dynlrp_condition_{i}")
            ph.meta["val"] = mask_fake
            self.cond_of.setdefault(n, []).append((pub, ph, dim))
        for n in self.nodes:
            if n.op in ("call_function", "get_attr", "call_method", "call_module"):
                env[n] = g.node_copy(n, lambda a: env[a])

    def seed(self) -> None:
        """The relevance of each explained output and their summed total (per sample, or per call for outputs
        without a batch dimension)."""
        if self.mode == "target":
            seed_fn = seed_from_target if self.batched else seed_from_target_call
        else:
            seed_fn = seed_given
        total_fn = per_sample_total if self.batched else call_total
        ys = [self.env[y] for y in self.y_srcs]
        self.seed_total = None
        unreached = []
        for k, y in enumerate(self.y_srcs):
            if len(ys) == 1:
                extra = self.seed_ph
            elif self.mode == "target":
                extra = self.emit(target_column, self.seed_ph, k)
            else:
                extra = self.emit(seed_part, self.seed_ph, k, *ys)
            r_seed = self.emit(seed_fn, ys[k], extra)
            if seed_fn is seed_from_target:  # the target's value, not a sum over an output-sized seed
                total = self.emit(target_value, ys[k], extra)
            else:
                total = self.emit(total_fn, r_seed)
            self.seed_total = total if self.seed_total is None else self.emit(torch.ops.aten.add.Tensor,
                                                                              self.seed_total, total)
            ann = y.meta.get("dynlrp")
            if ann is not None and ann.status == FLOAT and seed_fn is seed_from_target and self.uses_gradient(y):
                g_seed = self.emit(seed_gradient, ys[k], extra)
                self.onehot[g_seed] = (ys[k], extra)
                self.add(y, None, g_seed, gradient=True)
            elif ann is not None and ann.status in (FLOAT, INDEX):
                self.add(y, None, r_seed)
            else:  # an output computed from no explained input (parameters only): its whole seed is absorbed
                unreached.append((y, r_seed))
        for y, r_seed in unreached:
            self.ledger(y, r_seed, [])

    def operands(self, n: fx.Node):
        """``(args template, kwargs template, operand values, output)``, tensors as promise nodes."""
        env = self.env
        refs: list[fx.Node] = []
        args_t = _template(n.args, refs)
        kwargs_t = _template(dict(n.kwargs), refs)
        vals = []
        for a in refs:
            v = _val(a)
            vals.append(self.promise_of(a) if isinstance(v, torch.Tensor) else env[a])
        return args_t, kwargs_t, vals, self.promise_of(n)

    def param_shares(self, n, rule, args_t, kwargs_t, vals, out_p, r_arg, extra, skip=()) -> None:
        """Emit ``rule`` for each parameter-derived operand of ``n`` (one slot at a time)."""
        for slot, a in tensor_slots(n):
            if a not in self.derived or slot in skip:
                continue
            op = RelevanceOp(rule, n.target, args_t, kwargs_t, [slot], [], extra, f"{n.name}:{a.name}")
            self.accumulate(self.RP, a, self.emit(operator.getitem, self.emit(op, r_arg, None, out_p, *vals), 0))

    # -- the reverse sweep ----------------------------------------------------------------------------------------
    def visit(self, n: fx.Node) -> None:
        """Emit the relevance op of forward node ``n`` if relevance reached it (after all its users)."""
        R = self.R
        if n in self.G and (n in self.cond_of or n in self.cap_of or n.op != "call_function"):
            self.materialize(n)  # read here (captured, conditioned) or an input's relevance (placeholders)
        if n in self.cond_of and n in R:
            self.condition(n)
        if n in self.cap_of and n in R:
            r_cap = R[n]
            if isinstance(r_cap, dict):
                r_cap = r_cap.get(0)
            if r_cap is not None:
                for pub in self.cap_of[n]:
                    self.captured[pub] = r_cap
        if n in self.RP and n.op == "call_function":
            # a route op between a parameter and its user: pass the parameter relevance back with its VJP
            rp = self.RP.pop(n)
            args_t, kwargs_t, vals, out_p = self.operands(n)
            self.param_shares(n, Route(), args_t, kwargs_t, vals, out_p, rp, {})
        if (n not in R and n not in self.G) or n.op != "call_function":
            return
        if n.target is operator.getitem:
            if n in self.G:
                if self.uses_gradient(n.args[0]):
                    self.add(n.args[0], n.args[1], self.G.pop(n), gradient=True)
                else:
                    self.materialize(n)
            if n in R:
                self.add(n.args[0], n.args[1], R.pop(n))
            return
        ann = n.meta.get("dynlrp")
        if ann is None or ann.rule is None or ann.status not in (FLOAT, INDEX):
            raise RuntimeError(f"internal: relevance reached node {n.name} ({n.target}) which has no rule")
        args_t, kwargs_t, vals, out_p = self.operands(n)
        use_g = self.uses_gradient(n)
        if not use_g and n in self.G and not isinstance(self.G[n], dict):
            self.materialize(n)  # one product here rather than a conversion inside the op
        r_arg, g_arg = (self.incoming(store.pop(n, None), n) for store in (R, self.G))
        extra = self.extra(n)
        slot_nodes = dict(tensor_slots(n))
        # the epsilon rule (and AttnLRP's LayerNorm rule) in gradient form on one output: its ledger entry is read
        # from the output side (see Rule.absorbed_form, Epsilon.gradient_and_absorbed); LRP-0 at an op without
        # additive constants absorbs nothing and gets none
        # (not for float16/bfloat16 outputs: the identity needs z == f(x) to float32 precision, and a half-precision
        # z is rounded, so those ops measure both sides)
        # (and not when relevance arrived as well: converting it to G drops it where z == 0, e.g. exp(0) = 1 at
        # logsumexp's maximum, a loss only the measured ledger sees)
        # (a multi-output op counts when one output carries relevance: batch norm's normalised output)
        live = [i for i, g in enumerate(g_arg) if g is not None] if isinstance(g_arg, tuple) else None
        out_val = _val(n) if live is None else (_val(n)[live[0]] if len(live) == 1 else None)
        analytic = (use_g and r_arg is None and ann.rule.absorbed_form(n.target)
                    and isinstance(out_val, torch.Tensor) and out_val.dtype not in _LOW)
        spec = facts(n.target)
        bias = spec.bias
        # the float operands that receive no relevance: each adds a constant, unless it multiplies the data (a
        # convolution's or a matmul's weight: a factor position of the table), which adds nothing
        constants = [(s, a) for s, a in slot_nodes.items() if s not in ann.slots and _is_float(_val(a))]

        def scales(s) -> bool:
            return s[0] in spec.factors and s[0] != bias

        additive = any(s not in ann.factors and not scales(s) for s, _ in constants) or (
            bias is not None and bias < len(n.args) and isinstance(n.args[bias], (int, float)) and n.args[bias] != 0)
        if analytic:
            # the ledger reads per-sample sums: the rule may sum its entry over every dim but the batch's
            led_bdim = _batch_dim(out_val, self.batch_symbol, n, self.example_batch) if self.batched else None
            if led_bdim is not None and led_bdim[1] != 1:
                led_bdim = None  # (T*B, E): the outer factor describes the whole tensor's layout, not one dim's
            # whether every additive constant is a parameter or a finite number (a bias): its share is then summed
            # without the guard a computed constant (a mask that may hold -inf) needs
            finite_constant = all(a.op == "placeholder" and a.name in self.parameters for _, a in constants) and all(
                math.isfinite(v) for v in n.args if isinstance(v, float))
            extra = {**extra, "additive": additive, "batch_dim": led_bdim[0] if led_bdim is not None else None,
                     "finite_constant": finite_constant}
        # (a rule without an `epsilon` has a stabiliser of its own: gamma, z+)
        want_absorbed = analytic and self.keep_ledger and (additive or getattr(ann.rule, "epsilon", None) != 0)
        if analytic and isinstance(ann.rule, Epsilon) and self.sparse_seed_pullback(n, ann, g_arg, vals,
                                                                                      want_absorbed):
            return
        op = RelevanceOp(ann.rule, n.target, args_t, kwargs_t, ann.slots, ann.factors, extra, n.name, gradient=use_g,
                         absorbed=want_absorbed, masked=n in self.masked_values)
        rel = self.emit(op, r_arg, g_arg, out_p, *vals)
        res_fake = rel.meta["val"]
        rel.meta["dynlrp_rule"] = ann.rule
        rel.meta["dynlrp_for"] = n.name
        operand_promise = {}
        for a, v in zip(_operand_refs(n), vals):
            operand_promise.setdefault(a, v)
        masked = ann.rule_class == "softmax"  # -inf scores: their zero gradient must give zero relevance
        r_ins = []
        for i, (slot, rf) in enumerate(zip(ann.slots, res_fake)):
            if rf is None:
                continue
            gi = self.g.call_function(operator.getitem, (rel, i))
            gi.meta["val"] = rf
            src = slot_nodes[slot]
            r_ins.append(((operand_promise[src], None, gi, masked or src in self.masked_values) if use_g else gi, src))
            if use_g and g_arg in self.onehot and n.target in _ROW_MAJOR_VIEWS:
                self.onehot[gi] = self.onehot[g_arg]  # the same one-hot seed in the operand's shape
            self.add(src, None, gi, gradient=use_g)
        # a conservative rule still drops the share of float operands that are not data (a class token
        # concatenated to the patches, a constant selected by where): those nodes get a ledger entry too; not a
        # factor of a product (it scales, it takes no share) nor an empty operand (a KV cache's first cat)
        leaky = any(not scales(s) and not _static_empty(_val(a)) for s, a in constants)
        if analytic:
            if op.absorbed:
                dens = self.g.call_function(operator.getitem, (rel, len(ann.slots)))
                dens.meta["val"] = res_fake[len(ann.slots)]
                if led_bdim is None:
                    self.ledger(n, dens, [])
                else:  # the rule summed over every other dim: per sample already, or (B*T,)
                    exact = self.exact_batch(out_val, led_bdim)
                    self.ledger(n, dens, [], out_bdims=["sample" if exact else (0, 1)])
        # (a conservative rule may leave a slot without relevance: the others then carry all of it, as the
        # normaliser identity gives x * g(x) to x alone; only a rule that passed nothing at all is measured)
        elif not ann.rule.conservative or leaky or not r_ins:
            self.ledger(n, self.ledger_outs(r_arg, g_arg, out_p, n in self.masked_values), r_ins)
        if self.derived:
            prule = _param_rule(ann)
            if prule is not None:
                self.param_shares(n, prule, args_t, kwargs_t, vals, out_p, r_arg, ann.extra, skip=ann.slots)

    def sparse_seed_pullback(self, n: fx.Node, ann: Any, g_arg: Any, vals: list, want_absorbed: bool) -> bool:
        """Emit :func:`seed_linear_pullback` for ``n`` if ``n`` is an ``mm``/``addmm`` with one data operand
        (the input, not the weight) whose only incoming relevance is the target's one-hot seed; ``False`` (nothing
        emitted) otherwise. Its ledger entry is per sample."""
        if not isinstance(g_arg, fx.Node) or g_arg not in self.onehot or n.kwargs:
            return False
        aten = torch.ops.aten
        if n.target is aten.mm.default and list(ann.slots) == [(0,)]:
            w_pos, bias_pos = 1, None
        elif n.target is aten.addmm.default and list(ann.slots) == [(1,)]:
            w_pos, bias_pos = 2, 0
        else:
            return False
        bias = n.args[bias_pos] if bias_pos is not None else None
        w = n.args[w_pos]
        if not isinstance(w, fx.Node) or (bias is not None and not (
                isinstance(bias, fx.Node) and _val(bias).ndim <= 1)):
            return False  # a bias of the output's shape: the generic rule
        y, target = self.onehot[g_arg]
        y_val, n_cols = _val(y), _val(w).shape[1]
        # each sample must own whole rows of the (M, N) output: y's last dim is N (sizes read only when static)
        if y_val.ndim < 2 or type(y_val.shape[-1]) is not int or type(n_cols) is not int or y_val.shape[-1] != n_cols:
            return False
        refs = _operand_refs(n)
        vals_of = dict(zip(refs, vals))
        rel = self.emit(seed_linear_pullback, y, target, vals_of[w], vals_of[bias] if bias is not None else None,
                        float(ann.rule.epsilon), want_absorbed)
        rel.meta["dynlrp_rule"] = ann.rule
        rel.meta["dynlrp_for"] = n.name
        res_fake = rel.meta["val"]
        gi = self.g.call_function(operator.getitem, (rel, 0))
        gi.meta["val"] = res_fake[0]
        self.add(n.args[ann.slots[0][0]], None, gi, gradient=True)
        if want_absorbed:
            dens = self.g.call_function(operator.getitem, (rel, 1))
            dens.meta["val"] = res_fake[1]
            self.ledger(n, dens, [], out_bdims=["sample"])
        return True

    def incoming(self, r: Any, n: fx.Node) -> Any:
        """What reached ``n`` in one form, as the relevance op takes it: a node, a tuple per output, or ``None``."""
        return tuple(r.get(i) for i in range(len(_val(n)))) if isinstance(r, dict) else r

    @staticmethod
    def ledger_outs(r_arg: Any, g_arg: Any, out_p: fx.Node, masked: bool) -> tuple:
        """The output side of a ledger entry: relevance nodes, and ``(value, index, G, False)`` entries for
        gradient-form relevance (see :func:`_ledger_term`)."""
        outs = [x for x in (r_arg if isinstance(r_arg, tuple) else (r_arg,)) if x is not None]
        if isinstance(g_arg, tuple):
            outs += [(out_p, i, g, masked) for i, g in enumerate(g_arg) if g is not None]
        elif g_arg is not None:
            outs.append((out_p, None, g_arg, masked))
        return tuple(outs)

    def condition(self, n: fx.Node) -> None:
        """``condition=`` at ``n``: record the relevance reaching it per feature, then keep only the masked share
        (what the mask removes goes to the ledger)."""
        r = self.R[n]
        if isinstance(r, dict):
            raise ValueError(f"condition: node {n.name} has several outputs; condition a module with one output")
        emit = self.emit
        for pub, ph, dim in self.cond_of[n]:
            if isinstance(dim, Routed):  # a mixture-of-experts layer: each top-k slot by the expert it went to
                ids = self.env[self.by_name[dim.index]]
                self.conditioned[pub] = emit(routed_relevance, r, ph, ids)
                masked = emit(mask_routed, r, ph, ids)
            else:
                ndim = _val(r).ndim
                rest = [d for d in range(1, ndim) if d != dim]  # (an empty dim list would sum over every dim)
                self.conditioned[pub] = emit(torch.ops.aten.sum.dim_IntList, r, rest) if rest else r
                mask = ph
                for _ in range(dim - 1):
                    mask = emit(torch.ops.aten.unsqueeze.default, mask, 1)
                for _ in range(ndim - 1 - dim):
                    mask = emit(torch.ops.aten.unsqueeze.default, mask, -1)
                masked = emit(torch.ops.aten.mul.Tensor, r, mask)
            self.ledger(n, r, [(masked, n)])
            r = masked
        self.R[n] = r

    def exact_batch(self, val: torch.Tensor, bdim: tuple) -> bool:
        """Whether dim ``bdim[0]`` of ``val`` (from :func:`_batch_dim`) is exactly the batch, not the batch merged
        with other dims (``(B*T, E)``)."""
        if bdim[1] != 1:
            return False
        size = val.shape[bdim[0]]
        if self.batch_symbol is None or _expr(size) == self.batch_symbol:
            return True
        return not isinstance(size, torch.SymInt) and int(size) == self.example_batch

    def ledger(self, n: fx.Node, r_arg: Any, r_ins: list, out_bdims: list | None = None) -> None:
        """A ledger entry: what ``n``'s relevance op absorbed, per sample (``out_bdims``: the batch position of each
        output-side entry, when the caller knows it; see :func:`_per_sample`)."""
        if not self.keep_ledger:
            return
        routs = [x for x in (r_arg if isinstance(r_arg, tuple) else (r_arg,)) if x is not None]
        if out_bdims is not None:
            out_b, in_b = list(out_bdims), []
        elif self.batched:
            out_b = [_batch_dim(_val(_ledger_node(x)), self.batch_symbol, n, self.example_batch) for x in routs]
            in_b = [_batch_dim(_val(_ledger_node(x)), self.batch_symbol, src, self.example_batch) for x, src in r_ins]
            if any(b is None for b in out_b + in_b):
                self.unattributed.append(n.name)
        else:  # one sample per call: the ledger (of size 1) takes whole totals
            out_b, in_b = [None] * len(routs), [None] * len(r_ins)
        led = LedgerOp(out_b, in_b, n.name)
        self.ledgers.append(self.emit(led, self.seed_total, routs, [x for x, _ in r_ins]))

    def finish(self) -> ProgramOutputs:
        """The graph's outputs: ``(*outputs, seed_total, absorbed, *inputs, *params, *captured)``."""
        emit, env, R = self.emit, self.env, self.R
        absorbed = None
        for led in self.ledgers:
            absorbed = led if absorbed is None else emit(torch.ops.aten.add.Tensor, absorbed, led)
        if absorbed is None:
            absorbed = emit(torch.ops.aten.mul.Tensor, self.seed_total, 0.0)
        outs = [*(env[y] for y in self.y_srcs), self.seed_total, absorbed]
        names = []
        for ui in self.user_inputs:
            ph = self.by_name[ui.placeholder]
            ann = ph.meta.get("dynlrp")
            if ann is None:
                continue
            r = R.get(ph)
            if r is None:
                if ann.status != FLOAT:
                    continue  # integer input that reaches no embedding (e.g. an attention mask)
                r = emit(torch.ops.aten.zeros_like.default, env[ph])
            outs.append(r)
            names.append(ui.name)
        for ph, _pub in self.param_order:
            r = self.RP.get(ph)
            outs.append(r if r is not None else emit(torch.ops.aten.zeros_like.default, env[ph]))
        for pub, node_name in self.capture.items():
            r = self.captured.get(pub)
            outs.append(r if r is not None else emit(torch.ops.aten.zeros_like.default, env[self.by_name[node_name]]))
        for pub, (node_name, _dim) in self.conditions.items():
            r = self.conditioned.get(pub)
            if r is None:  # no relevance reached the node: zeros per feature
                ph = next(p for p_, p, _ in self.cond_of[self.by_name[node_name]] if p_ == pub)
                r = emit(torch.ops.aten.mul.Tensor, ph, 0.0)
            outs.append(r)
        self.g.output(tuple(outs))
        return ProgramOutputs(names, self.unattributed, [pub for _, pub in self.param_order], list(self.capture),
                              list(self.y_names), list(self.conditions))
