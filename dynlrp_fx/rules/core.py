"""The basic LRP rules: one per rule class (``docs/design.md``, section 4, "The op table").

Each docstring gives the formula. ``x_k`` are the data operands, ``z`` the output, ``R`` its relevance.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import (
    Rule,
    RuleContext,
    batched_matmul,
    divide_zero_at_zero,
    nan_to_zero,
    nonnegative_number,
    safe_divide,
)
from .table import facts, lookup

__all__ = [
    "Epsilon",
    "LRP0",
    "Route",
    "Identity",
    "Uniform",
    "AttnLRPSoftmax",
    "AttnLRPAttention",
    "NormAffine",
    "NormEpsilon",
    "NormalizerIdentity",
    "Numerator",
    "EmbeddingRows",
    "NoRelevance",
]

LINEAR = frozenset({"linear", "bilinear"})


def _sum_to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if t.shape == like.shape:
        return t
    return t.sum_to_size(like.shape)


def scaled_parts(g: torch.Tensor, z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(s, t)`` with ``s = g * z / stab(z)``, the gradient-form relevance ``g`` of a linear output ``z`` scaled by
    the epsilon rule (``R / stab(z) = G * z / stab(z)`` for ``R = z * G``), and ``t = g / (|z| + eps)``; ``(g, None)``
    for ``eps = 0`` (no multiplication by one)."""
    if eps == 0:
        return g, None
    t = g / (z.to(g.dtype).abs() + eps)
    # g * |z| / (|z| + eps) written as g - eps * t: four passes, 0 at z = 0, and g (0 where nothing arrives) at a
    # masked score z = -inf, where t = 0, rather than 0 * inf = NaN
    return torch.add(g, t, alpha=-eps), t


def scaled(g: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
    """``g * z / stab(z)`` (see :func:`scaled_parts`), ``g`` itself for ``eps = 0``."""
    return scaled_parts(g, z, eps)[0]


class Epsilon(Rule):
    r"""LRP-epsilon (z-rule) for ops that are (multi)linear in their data operands.

    .. math::  R_k = x_k \odot J_k^\top \frac{R}{\mathrm{stab}(z)} \,/\, m_k

    where ``z`` is the op's output *including* biases and constant operands (their share of ``R`` is absorbed
    and recorded in the conservation ledger), and ``m_k`` is the number of data factors of a multilinear op when
    ``x_k`` is one of them (``m = 2`` for ``q @ k^T`` with two data operands: AttnLRP's uniform-epsilon rule for
    bilinear ops), else 1. ``epsilon=0`` is LRP-0 with ``R/z := 0`` where ``z == 0`` (then equals gradient x input
    on piecewise-linear networks).
    """

    name = "epsilon"
    conservative = False
    classes = LINEAR
    input_proportional = True  # R_k = x_k * J_k^T (R / stab(z)) / m_k

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = nonnegative_number(epsilon, f"{type(self).__name__}: epsilon")

    def relevance(self, ctx: RuleContext):
        s = [safe_divide(r, z, self.epsilon) for r, z in zip(ctx.relevances, ctx.outputs)]
        grads = ctx.vjp(ctx.slots, s)
        m = max(1, sum(1 for f in ctx.factors if f in ctx.slots))
        out = []
        for slot, g in zip(ctx.slots, grads):
            r = ctx.surrogate(slot) * g
            if slot in ctx.factors and m > 1:
                r = r / m
            out.append(r)
        return out

    def gradient_form(self, op, slots, meta) -> bool:
        return True

    def gradient(self, ctx: RuleContext):
        """``G_k = J_k^T (G * z / stab(z)) / m_k``: for ``eps = 0`` the (scaled) gradient itself. Where ``z == 0``
        LRP-0's safe division sends nothing back and this form sends ``J^T G``; the relevance there is
        ``z * G = 0`` either way, so both forms agree except in how an exact cancellation inside ``z`` is split."""
        return self._pullback(ctx, [scaled(g, z, self.epsilon) for g, z in zip(ctx.relevances, ctx.outputs)])

    def absorbed_form(self, op: Any) -> bool:
        # this class's own gradient form only: a subclass that changes it (gamma's modified weights) is measured
        del op
        return type(self).gradient is Epsilon.gradient

    def gradient_and_absorbed(self, ctx: RuleContext) -> tuple[list, torch.Tensor]:
        """:meth:`gradient` of a single-output application, and what it absorbed: ``G * z - s * (z - c)`` with
        ``s = G * z / stab(z)`` and ``c = f(data := 0)`` the additive constants (bias, shift). The inputs'
        relevance sums to ``sum s * (z - c)`` (Euler's theorem for a map linear in its data), so the ledger needs
        no input. Per output element, or summed over every dim but ``ctx.meta["batch_dim"]`` when ``pair`` gives
        one (the ledger only reads per-sample sums; a bias then costs one reduction of ``s`` over its broadcast
        dims instead of a product). ``ctx.meta["additive"] = False`` says the op adds no constant (``c = 0``)."""
        g = ctx.relevances[0]
        z = ctx.outputs[0].to(g.dtype)
        s, t = scaled_parts(g, z, self.epsilon)
        c = additive_constant(ctx) if ctx.meta.get("additive", True) else None
        absorbed = _absorbed(s, t, z, c, ctx.meta.get("batch_dim"), self.epsilon, _finite_op(ctx.op),
                             ctx.meta.get("finite_constant", False))
        return self._pullback(ctx, [s]), absorbed

    def _pullback(self, ctx: RuleContext, s: list) -> list:
        grads = ctx.vjp(ctx.slots, s)
        m = max(1, sum(1 for f in ctx.factors if f in ctx.slots))
        return [g / m if slot in ctx.factors and m > 1 else g for slot, g in zip(ctx.slots, grads)]


#: ops whose output is finite where their operands and parameters are: contractions and inference batch norm. A
#: sum or an added mask may hold -inf (a masked attention score), where a ledger product with z would be NaN
_FINITE_OPS = frozenset({"convolution", "_convolution", "mm", "bmm", "addmm", "baddbmm",
                         "_native_batch_norm_legit_no_training"})


def _finite_op(op) -> bool:
    return getattr(op, "_opname", None) in _FINITE_OPS


def _reduce(t: torch.Tensor, keep: int | None) -> torch.Tensor:
    """``t`` summed over every dim but ``keep`` (``None``: ``t`` itself)."""
    dims = [] if keep is None else [d for d in range(t.ndim) if d != keep]
    # (an empty dim list would make sum() reduce every dim, the batch's too)
    return t.sum(dims) if dims else t


def _static(size) -> int | None:
    return size if type(size) is int else None


def _absorbed(s: torch.Tensor, t: torch.Tensor | None, z: torch.Tensor, c: torch.Tensor | None, keep: int | None,
              eps: float, finite: bool = True, finite_constant: bool = False) -> torch.Tensor:
    """What a linear map in gradient form absorbed (:meth:`Epsilon.gradient_and_absorbed`): ``eps * t * z`` (the
    stabiliser's share, ``t = G / (|z| + eps)``; ``t`` is ``None`` without one) plus ``s * c`` (the additive
    constant's; ``c`` may be ``None``), per output element or summed as :func:`_dot` sums (``keep``; a part summed
    per row makes the others sum their last dim too). ``finite = False``: the op's output or constant may hold
    ``-inf`` (a masked score), so the stabiliser's share is written ``eps * sign(z) * s`` and the constant's share is
    0 where nothing arrives (``s = 0``) rather than ``0 * inf = NaN`` (decided by the op, not by comparing sizes,
    which would specialise them). ``finite_constant``: the constant is finite whatever the op (a bias parameter
    added to a linear map's output), so its share is summed as for a finite op. Zeros of the entry's shape when
    there is no part."""
    parts = []
    if t is not None:
        # (eps scales the per-sample sums, not the products, when the entry is summed: one pass less)
        parts.append(_dot(t, z, keep, eps) if finite else _reduce(s * torch.sign(z), keep) * eps)
    if c is not None:
        c = c.to(s.dtype)
        # (-inf in c meets s = 0 where a masked score gets no gradient: each such 0 * -inf = NaN is 0, replaced per
        # element before the sum; one nan_to_num pass instead of an s == 0 mask and a where)
        parts.append(_dot(s, c, keep) if finite or finite_constant else _reduce(nan_to_zero(s * c), keep))
    if not parts:  # nothing absorbed (pair asks only where something may be)
        return torch.zeros_like(s) if keep is None else s.new_zeros((s.shape[keep],))
    if any(p.ndim == s.ndim - 1 for p in parts):
        parts = [p.sum(-1) if p.ndim == s.ndim else p for p in parts]
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def _dot(s: torch.Tensor, c: torch.Tensor, keep: int | None, scale: float = 1.0) -> torch.Tensor:
    """``scale * s * c`` (``c`` broadcasts against ``s``) summed as :func:`_reduce` does; ``s`` is first reduced over
    the dims ``c`` broadcasts along (a bias is per channel), so no product of ``s``'s size is made for it. A bias
    along the last dim is summed per row (``s @ c``) rather than multiplied out, unless the last dim is ``keep``."""
    along_last = (c.ndim == 1 and s.ndim >= 2 and scale == 1.0 and s.dtype == c.dtype
                  and _static(c.shape[0]) is not None and _static(s.shape[-1]) == c.shape[0])
    if along_last and (keep is None or keep % s.ndim != s.ndim - 1):
        # a bias along the last dim of (rows, features): one matrix-vector product sums each row, instead of a
        # product of s's size and a sum (the ledger only reads sums; it finds the batch in the rows, or `keep`)
        return _reduce(torch.matmul(s, c), None if keep is None else keep % s.ndim)
    if keep is None:
        return s * c * scale if scale != 1.0 else s * c
    c = c.reshape((1,) * (s.ndim - c.ndim) + tuple(c.shape))
    # only static sizes of 1 are read (a symbolic size compared with 1 would specialise it)
    dims = [d for d in range(s.ndim)
            if d != keep and _static(c.shape[d]) == 1 and _static(s.shape[d]) != 1]
    if dims:
        s = s.sum(dims, keepdim=True)
    total = _reduce(s * c, keep)
    return total * scale if scale != 1.0 else total


def additive_constant(ctx: RuleContext) -> torch.Tensor | None:
    """``c = f(data := 0)`` of an op linear in its data operands (``None``: no additive constant): the bias of a
    multilinear op (its table ``bias`` operand; channels in dim 1 for an output of rank > 2, as a convolution's),
    else the op evaluated with its data operands zeroed."""
    spec = lookup(ctx.op)
    if spec is not None and spec.kind == "multilinear":
        b = ctx.args[spec.bias] if spec.bias is not None and spec.bias < len(ctx.args) else None
        if not isinstance(b, torch.Tensor) or (spec.bias,) in ctx.slots:
            return None  # no bias, or a bias that is data (it takes its share)
        return bias_like_output(ctx, b)
    if ctx.op is torch.ops.aten._native_batch_norm_legit_no_training.default:
        return _batch_norm_shift(ctx)
    # the op on zeroed data at the smallest shape it accepts (size 1 everywhere, then with the channel dim 1 kept
    # for batch norm's per-channel statistics): the constant broadcasts against the output, and no output-sized
    # tensor is made for a bias or a shift; the data's own shape as the last resort
    for keep in ((), (1,)):
        try:
            return ctx.call({
                slot: torch.zeros([ctx.value(slot).shape[d] if d in keep else 1 for d in range(ctx.value(slot).ndim)],
                                  dtype=ctx.value(slot).dtype, device=ctx.value(slot).device)
                for slot in ctx.slots
            })[0]
        except (RuntimeError, IndexError, ValueError):
            continue
    return ctx.call({slot: torch.zeros_like(ctx.value(slot)) for slot in ctx.slots})[0]


def bias_like_output(ctx: RuleContext, b: torch.Tensor) -> torch.Tensor:
    """A multilinear op's bias ``b`` shaped to broadcast against its output: a convolution's is per channel (dim
    1), anything else broadcasts as it is."""
    z = ctx.outputs[0]
    if b.ndim == 1 and z.ndim > 2 and "convolution" in ctx.op._opname:
        return b.reshape((-1,) + (1,) * (z.ndim - 2))
    return b


def _batch_norm_shift(ctx: RuleContext) -> torch.Tensor:
    """Inference batch norm's ``f(0) = bias - running_mean * weight / sqrt(running_var + eps)``, shaped
    ``(1, C, 1, ...)`` (read from the parameters: the CPU kernel run on a ``(1, 1, ...)`` input broadcasts the first
    channel's statistics instead of refusing the size)."""
    x, weight, bias, mean, var, _momentum, eps = ctx.args[:7]
    shift = -mean * torch.rsqrt(var + eps)
    if weight is not None:
        shift = shift * weight
    if bias is not None:
        shift = shift + bias
    return shift.reshape([1, -1] + [1] * (x.ndim - 2))


class LRP0(Epsilon):
    """LRP-0: :class:`Epsilon` with ``epsilon = 0`` (safe division: ``R/z := 0`` where ``z == 0``)."""

    name = "lrp0"

    def __init__(self):
        super().__init__(0.0)


class Route(Rule):
    r"""Route relevance like values: :math:`R_k = J_k^\top R`.

    For ops that move, copy, select or sum values without scaling them (reshape, permute, expand, slice, cat,
    index, gather, ``where`` value operands, max-pool winners), the VJP sends each output element's relevance to
    the element it came from: exactly conservative.
    """

    name = "route"
    conservative = True
    classes = frozenset({"route"})

    def relevance(self, ctx: RuleContext):
        if ctx.op is torch.ops.aten.constant_pad_nd.default and ctx.slots:
            return [_unpad(ctx.relevances[0], ctx.args[1])] + [None] * (len(ctx.slots) - 1)
        return ctx.vjp(ctx.slots, ctx.relevances)

    def gradient_form(self, op, slots, meta) -> bool:
        return True

    def gradient(self, ctx: RuleContext):
        """The same map: the output's elements are the input's, so ``R_k = J_k^T R`` and ``G_k = J_k^T G`` agree."""
        return self.relevance(ctx)


def _unpad(r: torch.Tensor, pad) -> torch.Tensor:
    """The pullback of ``constant_pad_nd(x, pad)`` (``pad``: before/after pairs from the last dimension on), written
    with slices and non-negative pads: the VJP torch records (``constant_pad_nd`` with negated pads) cannot run on
    fake tensors whose batch size is symbolic."""
    aten = torch.ops.aten
    for i in range(len(pad) // 2):
        d = r.dim() - 1 - i
        lo, hi = int(pad[2 * i]), int(pad[2 * i + 1])
        r = aten.slice.Tensor(r, d, max(lo, 0), r.shape[d] - max(hi, 0))  # padded elements: not the input's
        if lo < 0 or hi < 0:  # the forward cropped this side: the cropped elements receive nothing
            spec = [0] * (2 * i + 2)
            spec[2 * i], spec[2 * i + 1] = max(-lo, 0), max(-hi, 0)
            r = aten.constant_pad_nd(r, spec, 0.0)
    return r


class Identity(Rule):
    r"""Identity (pass) rule for elementwise nonlinearities: :math:`R_x = R` (ReLU, GELU, SiLU, tanh...).

    For ReLU this is LRP-0 through the activation (consistent with gradient x input)."""

    name = "identity"
    conservative = True
    classes = frozenset({"identity"})

    def relevance(self, ctx: RuleContext):
        (slot,) = ctx.slots[:1] or [None]
        res = [None] * len(ctx.slots)
        if slot is not None:
            res[0] = _sum_to(ctx.relevances[0], ctx.value(slot)).to(ctx.dtype)
        return res

    def gradient_form(self, op, slots, meta) -> bool:
        # exact where f(0) = 0 (``pair`` evaluates the op at 0): there R = f(0) * G = 0 is what x * G_x gives
        return bool(slots) and (facts(op).homogeneous or bool(meta.get("zero_at_zero")))

    def gradient(self, ctx: RuleContext):
        """``G_x = G * f(x) / x`` (``0`` at ``x = 0``); for positively homogeneous ``f`` (ReLU) that is the op's
        own gradient, which reads only the output."""
        slot = ctx.slots[0]
        res: list = [None] * len(ctx.slots)
        if facts(ctx.op).homogeneous:
            res[0] = ctx.vjp([slot], ctx.relevances)[0]
            return res
        x = ctx.value(slot).to(ctx.dtype)
        # f(0) = 0 where this form is used (``gradient_form``), so the quotient is 0 / 0 only where x is 0
        res[0] = _sum_to(ctx.relevances[0] * divide_zero_at_zero(ctx.outputs[0].to(ctx.dtype), x), x)
        return res


class Uniform(Rule):
    r"""Uniform rule for products of data tensors (gates, AttnLRP): :math:`R_k = R / m` for the ``m`` data
    factors (summed over broadcast dimensions)."""

    name = "uniform"
    conservative = True
    classes = frozenset({"product"})

    def relevance(self, ctx: RuleContext):
        factors = [s for s in ctx.slots if s in ctx.factors] or ctx.slots
        m = len(factors)
        r = ctx.relevances[0]
        return [_sum_to(r / m, ctx.value(s)) if s in factors else None for s in ctx.slots]

    def gradient_form(self, op, slots, meta) -> bool:
        return True

    def gradient(self, ctx: RuleContext):
        """``G_k = J_k^T G / m``: ``R / (m x_k)`` is ``G`` times the other factors over ``m``."""
        factors = [s for s in ctx.slots if s in ctx.factors] or ctx.slots
        grads = dict(zip(factors, ctx.vjp(factors, ctx.relevances)))
        return [grads[s] / len(factors) if s in grads else None for s in ctx.slots]


class AttnLRPSoftmax(Rule):
    r"""AttnLRP softmax rule (Achtibat et al. 2024, deep Taylor at the input):

    .. math::  R_x = x \odot (R - s \textstyle\sum_{dim} R)

    with ``s = softmax(x)``. Masked entries (``x = -inf``, or an additive mask's ``finfo.min``: see
    :func:`_masked_scores`) get zero relevance, instead of ``inf * 0 = NaN`` or ``finfo.min * R``, which overflows
    to ``-inf`` and turns into NaN at the mask's add. A row whose every entry is masked (a padded query, a sample
    with no tokens: its softmax is uniform under a finite mask) therefore passes no relevance; the ledger records
    what it held.
    """

    name = "attnlrp_softmax"
    conservative = False
    classes = frozenset({"softmax"})

    def relevance(self, ctx: RuleContext):
        x0 = ctx.value(ctx.slots[0])
        x = x0.to(ctx.dtype)
        dim = ctx.args[1]
        s = ctx.outputs[0].to(ctx.dtype)
        r = ctx.relevances[0]
        term = r - s * r.sum(dim, keepdim=True)
        res = torch.where(_masked_scores(x, x0.dtype) | (term == 0), 0.0, x * term)
        return [res] + [None] * (len(ctx.slots) - 1)

    def gradient_form(self, op, slots, meta) -> bool:
        return True

    def gradient(self, ctx: RuleContext):
        """``G_x = s * (G - sum(s * G))``, the softmax's gradient (``R - s sum R`` for ``R = s * G``), zero at
        masked scores."""
        x0 = ctx.value(ctx.slots[0])
        s = ctx.outputs[0].to(ctx.dtype)
        g = ctx.relevances[0]
        term = s * (g - (s * g).sum(ctx.args[1], keepdim=True))
        res = torch.where(_masked_scores(x0, x0.dtype), 0.0, term)
        return [res] + [None] * (len(ctx.slots) - 1)


def _masked_scores(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Where attention scores ``x`` (computed in ``dtype``) are masked: ``-inf``, or at most half of ``dtype``'s
    most negative value (an additive mask of ``finfo.min``, as Hugging Face's eager attention adds; no score of a
    real model comes near it, and ``finfo.min`` plus a score rounds to ``finfo.min`` or overflows to ``-inf``)."""
    floor = torch.finfo(dtype).min / 2 if dtype.is_floating_point else -math.inf
    return torch.isinf(x) | (x <= floor)


def _attn_mask_bool(L, S, device, is_causal):
    return torch.ones(L, S, dtype=torch.bool, device=device).tril(diagonal=S - L if L != S else 0) if is_causal else None


class AttnLRPAttention(Rule):
    r"""AttnLRP for ``scaled_dot_product_attention`` (``o = softmax(q k^T * scale + mask) v``).

    * ``o = p v`` is bilinear: uniform-epsilon, :math:`R_p = p \odot (R/2\,stab(o)) v^\top`,
      :math:`R_v = v \odot p^\top (R / 2\,stab(o))`.
    * softmax: :class:`AttnLRPSoftmax` on the masked scores ``s``.
    * masks: a boolean or causal mask routes ``R_s`` to the kept scores; an additive float mask is a constant
      operand of an add (epsilon rule, its share absorbed; ``finfo.min`` and ``-inf`` entries give 0, not NaN).
      A query row whose every key is masked has ``p = 0`` (SDPA's output there), so it passes no relevance.
    * ``q k^T`` is bilinear: uniform-epsilon as above.

    ``cp=True`` gives CP-LRP (Ali et al. 2022): the attention weights are treated as constants, all relevance
    goes to ``v`` through :math:`R_v = v \odot p^\top (R / stab(o))`.
    """

    name = "attnlrp_sdpa"
    conservative = False
    classes = frozenset({"sdpa"})

    def __init__(self, epsilon: float = 1e-6, cp: bool = False):
        self.epsilon = nonnegative_number(epsilon, f"{type(self).__name__}: epsilon")
        self.cp = bool(cp)

    def relevance(self, ctx: RuleContext):
        return self._propagate(ctx, False)

    def gradient_form(self, op, slots, meta) -> bool:
        return True

    def gradient(self, ctx: RuleContext):
        """The same steps on ``G`` (``R = o * G``): each division by a stabilised output becomes
        ``G * z / stab(z)`` and each product with an operand is left out; for ``eps = 0`` the gradient of SDPA
        with the bilinear shares halved and, under ``cp=True``, the attention weights held constant (LXT)."""
        return self._propagate(ctx, True)

    def _propagate(self, ctx: RuleContext, grad: bool):
        """:meth:`relevance` (``grad=False``) or :meth:`gradient` (``grad=True``)."""
        names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal"]
        vals = dict(zip(names, ctx.args))
        for k in names:
            if ("kw", k) in [("kw", kk) for kk in ctx.kwargs]:
                vals[k] = ctx.kwargs[k]
        q, k, v = vals["query"], vals["key"], vals["value"]
        mask = vals.get("attn_mask")
        is_causal = bool(vals.get("is_causal", False))
        scale = ctx.kwargs.get("scale")
        gqa = bool(ctx.kwargs.get("enable_gqa", False))
        dt = ctx.dtype
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        eps = self.epsilon
        E = q.size(-1)
        scale = 1.0 / math.sqrt(E) if scale is None else scale

        def expand_kv(t):
            if gqa and t.size(-3) != q.size(-3):
                return t.repeat_interleave(q.size(-3) // t.size(-3), -3)
            return t

        def scores_fn(q_, k_):
            return batched_matmul(q_, expand_kv(k_).transpose(-2, -1)) * scale

        def out_fn(p_, v_):
            return batched_matmul(p_, expand_kv(v_))

        # one trace of the scores serves the forward value and the pullback (a second vjp would copy q and k^T
        # into contiguous bmm operands again)
        scores, pb_scores = torch.func.vjp(scores_fn, q, k)
        L, S = scores.size(-2), scores.size(-1)
        s = scores
        # where scores are masked, as a boolean of the masks' own (broadcastable) shape when every mask is
        # boolean: the scores of finite q and k are finite, so the masks say it without passes over (B, H, L, S)
        off = None
        if is_causal:
            off = ~_attn_mask_bool(L, S, q.device, True)
            s = s.masked_fill(off, float("-inf"))
        float_mask = None
        if mask is not None:
            if mask.dtype == torch.bool:
                s = s.masked_fill(~mask, float("-inf"))
                off = ~mask if off is None else off | ~mask
            else:
                float_mask = mask.to(dt)
                s = s + float_mask
        # a query whose every key is masked (a padded row: left padding under a causal mask, a sample with no
        # tokens) has softmax 0/0 = NaN; SDPA outputs 0 there (torch's safe softmax), and so does this rule, so
        # such rows pass no relevance and the NaN never reaches the relevance of kept rows (no mask: nothing to do)
        p = torch.softmax(s, -1)
        if float_mask is not None:
            p = torch.where(torch.isneginf(s).all(-1, keepdim=True), 0.0, p)
        elif off is not None:
            p = torch.where(off.all(-1, keepdim=True), 0.0, p)
        # the op's own output is p @ v (0 in dead rows too): read it rather than multiply again
        o = ctx.outputs[0].to(dt) if not ctx.multi else out_fn(p, v)
        R = ctx.relevances[0].to(dt)
        slot_of = {"query": (0,), "key": (1,), "value": (2,)}
        for nm in ("query", "key", "value"):
            if ("kw", nm) in ctx.slots:
                slot_of[nm] = ("kw", nm)
        want = {nm: slot_of[nm] in ctx.slots for nm in slot_of}
        result = {}
        def times(x, g):  # relevance from a gradient-form share: x * g, or g itself in gradient form
            return g if grad else x * g

        if self.cp:
            sv = scaled(R, o, eps) if grad else safe_divide(R, o, eps)
            (gv,) = torch.func.vjp(lambda v_: out_fn(p, v_), v)[1](sv)
            result["value"] = times(v, gv)
        else:
            two = 2.0 if want["value"] else 1.0  # the bilinear p v shares R between p and v when both take it
            if grad:
                so = scaled(R, o, eps) / two
                if want["value"]:  # G_v = p^T G_o first: p is then read only by the scaling below, and dies there
                    result["value"] = torch.func.vjp(lambda v_: out_fn(p, v_), v)[1](so)[0]
                # the softmax's gradient form p * (G_p - rowsum(p * G_p)) with q k^T's epsilon scaling, as
                # (scaled p) * (G_p - c): rowsum(p * G_p) = rowsum(G_o * (p v)) = rowsum(G_o * o) is c, a dot product
                # per query row, so no (L, S) product or sum is formed; and p, scaled in place of the scores once the
                # softmax has read them, is one (L, S) buffer beside G_p instead of scores, p and G_p at once. A
                # boolean or causal mask needs no where: p is exactly 0 at its masked scores, so sq is too
                pf = p if float_mask is None else scaled(p, scores + float_mask, eps)
                pf = scaled(pf, scores, eps)
                c = (so * o).sum(-1, keepdim=True)
                (gp,) = torch.func.vjp(lambda p_: out_fn(p_, v), p)[1](so)
                sq = pf * (gp - c)
                if float_mask is not None:  # a row masked by finfo.min alone has a uniform softmax: 0, as the rule says
                    sq = torch.where(_masked_scores(s, mask.dtype), 0.0, sq)
            else:
                so = safe_divide(R, o, eps) / two
                _, pb = torch.func.vjp(out_fn, p, v)
                gp, gv = pb(so)
                result["value"] = times(v, gv)
                rp = p * gp
                term = rp - p * rp.sum(-1, keepdim=True)  # the softmax's gradient form: R_s = s * term
                masked = _masked_scores(s, mask.dtype) if float_mask is not None else off
                rs = s * term if masked is None else torch.where(masked | (term == 0), 0.0, s * term)
                if float_mask is not None:
                    rs = scores * safe_divide(rs, scores + float_mask, eps)
                    rs = torch.where(torch.isfinite(rs), rs, 0.0)
                sq = safe_divide(rs, scores, eps)
            # q k^T is bilinear too: its share is split between the operands that take relevance
            m = (1.0 if want["query"] else 0.0) + (1.0 if want["key"] else 0.0)
            gq, gk = pb_scores(sq / max(m, 1.0))
            result["query"] = times(q, gq)
            result["key"] = times(k, gk)
        inv = {v_: k_ for k_, v_ in slot_of.items()}
        return [result.get(inv.get(slot)) if slot in inv else None for slot in ctx.slots]


class NormAffine(Rule):
    r"""Whole-normalisation identity for ``native_layer_norm`` / ``native_group_norm``: the normalisation
    ``x_hat = (x - mean) / std`` is treated as identity, the affine part ``y = x_hat * w + b`` by epsilon:

    .. math::  R_x = (y - b) \odot R / \mathrm{stab}(y)

    (``R_x = R`` exactly when there is no bias). Not the AttnLRP rule (see :class:`NormEpsilon`, the default):
    the mean subtraction is a linear map that this rule skips. Kept for comparisons and custom composites
    (``{"layernorm": NormAffine()}``); training-mode ``_native_batch_norm_legit`` still uses it through
    :class:`NormEpsilon`."""

    name = "norm_identity"
    conservative = False
    classes = frozenset({"layernorm"})

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = nonnegative_number(epsilon, f"{type(self).__name__}: epsilon")

    def relevance(self, ctx: RuleContext):
        r = ctx.relevances[0]
        pos = facts(ctx.op).bias
        bias = ctx.args[pos] if pos is not None and pos < len(ctx.args) else None
        res = [None] * len(ctx.slots)
        if bias is None:
            res[0] = r
            return res
        y = ctx.outputs[0].to(r.dtype)
        y_nobias = ctx.call({(pos,): None}, keep=True)[0].to(r.dtype)
        res[0] = y_nobias * safe_divide(r, y, self.epsilon)
        return res


class NormEpsilon(Rule):
    r"""LayerNorm / GroupNorm with the standard deviation as a constant (Ali et al. 2022; AttnLRP, Achtibat et
    al. 2024, and its implementation LXT): only the division by the standard deviation is treated as identity,
    the rest ``y = w \odot (x - \mu(x)) \odot \mathrm{rstd} + b`` is an affine map of ``x`` (the mean
    subtraction included) and gets the epsilon rule:

    .. math::  s = w \odot \mathrm{rstd} \odot R / \mathrm{stab}(y), \qquad
               R_x = x \odot \big(s - \mathrm{mean}_{\mathcal{N}}(s)\big)

    with the mean over the normalised elements ``N`` (LayerNorm: the trailing ``normalized_shape`` dims;
    GroupNorm: the elements of each group); ``rstd`` is the op's own output. Equal to gradient x input through
    ``w * (x - mean(x)) / std(x).detach() + b`` when ``R = y * grad`` (LXT's efficient LayerNorm), and to the
    decomposed LayerNorm ``xc * rsqrt(mean(xc * xc) + eps) * w + b``, ``xc = x - mean(x)``, with its detected
    normaliser (identity to ``xc``) and epsilon through the ``sub``/``mean``. Without a bias it is conservative up to the
    stabiliser: ``sum R_x = sum (x - mean) * s = sum R``. Other ops of the class (training-mode batch norm) use
    :class:`NormAffine`."""

    name = "norm_epsilon"
    conservative = False
    classes = frozenset({"layernorm"})

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = nonnegative_number(epsilon, f"{type(self).__name__}: epsilon")

    def relevance(self, ctx: RuleContext):
        if not self.gradient_form(ctx.op, ctx.slots, ctx.meta):
            return NormAffine(self.epsilon).relevance(ctx)
        return self._propagate(ctx, False)

    def gradient_form(self, op, slots, meta) -> bool:
        return op._opname in ("native_layer_norm", "native_group_norm") and bool(slots) and slots[0] == (0,)

    def gradient(self, ctx: RuleContext):
        """``G_x = s - mean(s)`` with ``s = w * rstd * G * y / stab(y)``: the LayerNorm's gradient with the
        standard deviation held constant (LXT's), for ``eps = 0``."""
        return self._propagate(ctx, True)

    def absorbed_form(self, op: Any) -> bool:
        return op._opname in ("native_layer_norm", "native_group_norm")

    def gradient_and_absorbed(self, ctx: RuleContext) -> tuple[list, torch.Tensor]:
        r""":meth:`gradient` and what it absorbed, from the output side: with ``u = G * y / stab(y)``,
        ``sum R_x = sum x * (s - mean(s)) = sum (x - mean(x)) * s = sum (y - b) * u`` (the mean of ``s - mean(s)``
        is zero, and ``(x - mean) * rstd * w = y - b``), so ``sum R_y - sum R_x = sum (G - u) * y + sum b * u``:
        ``eps * t * y`` with ``t = G / (|y| + eps)``, plus the bias's share, as :meth:`Epsilon.gradient_and_absorbed`.
        The ledger then needs neither ``x`` nor (for ``eps = 0``) ``y``: along a residual stream of LayerNorms
        neither has to be kept or recomputed for it."""
        g = ctx.relevances[0]
        y = ctx.out[0].to(g.dtype)
        u, t = scaled_parts(g, y, self.epsilon)
        b = self._bias(ctx, y.ndim) if ctx.meta.get("additive", True) else None
        res: list = [None] * len(ctx.slots)
        res[0] = self._pullback(ctx, u)
        return res, _absorbed(u, t, y, b, ctx.meta.get("batch_dim"), self.epsilon)

    @staticmethod
    def _bias(ctx: RuleContext, ndim: int) -> torch.Tensor | None:
        """The op's bias, shaped to broadcast against its output (GroupNorm's is per channel, dim 1)."""
        if ctx.op._opname == "native_layer_norm":
            return ctx.args[3] if len(ctx.args) > 3 else None
        b = ctx.args[2]
        return None if b is None else b.reshape((-1,) + (1,) * (ndim - 2))

    def _propagate(self, ctx: RuleContext, grad: bool):
        """:meth:`relevance` (``grad=False``: ``R_x = x * (s - mean(s))``) or :meth:`gradient` (``grad=True``)."""
        r = ctx.relevances[0]
        y = ctx.out[0].to(r.dtype)
        u = scaled(r, y, self.epsilon) if grad else safe_divide(r, y, self.epsilon)
        g = self._pullback(ctx, u)
        res: list = [None] * len(ctx.slots)
        res[0] = g if grad else ctx.value((0,)).to(r.dtype) * g
        return res

    @staticmethod
    def _pullback(ctx: RuleContext, u: torch.Tensor) -> torch.Tensor:
        """``s - mean(s)`` with ``s = w * rstd * u``, the mean over the normalised elements: the pullback of
        ``w * (x - mean(x)) * rstd + b`` with ``rstd`` held constant."""
        x = ctx.value((0,))
        rstd = ctx.out[2].to(u.dtype)
        if ctx.op._opname == "native_layer_norm":
            # native_layer_norm(x, normalized_shape, weight, bias, eps) -> (y, mean, rstd)
            k = len(ctx.args[1])
            w = ctx.args[2] if len(ctx.args) > 2 else None
            if w is not None:
                u = u * w.to(u.dtype)
            if rstd.ndim != x.ndim:  # the stats keep the normalised dims as size-1 dims
                rstd = rstd.reshape(tuple(x.shape[: x.ndim - k]) + (1,) * k)
            s = u * rstd
            dims = tuple(range(x.ndim - k, x.ndim))
            return s - s.mean(dims, keepdim=True)
        # native_group_norm(x, weight, bias, N, C, HxW, group, eps) -> (y, mean, rstd), stats (N, group)
        w = ctx.args[1]
        if w is not None:
            u = u * w.to(u.dtype).reshape((-1,) + (1,) * (x.ndim - 2))
        n, gr = rstd.shape[0], rstd.shape[1]
        s = u.reshape(n, gr, -1) * rstd.reshape(n, gr, 1)
        return (s - s.mean(-1, keepdim=True)).reshape(x.shape)


class NormalizerIdentity(Rule):
    r"""Identity to the normalised value for detected normaliser products ``x * g(reduce(x))`` and
    ``x / g(reduce(x))`` (RMSNorm and LayerNorm after decomposition): :math:`R_x = R`, nothing flows into the
    variance path."""

    name = "normalizer_identity"
    conservative = True
    classes = frozenset({"normalizer", "div"})

    def relevance(self, ctx: RuleContext):
        target = ctx.meta.get("normalizer_slot", ctx.slots[0])
        r = ctx.relevances[0]
        return [_sum_to(r, ctx.value(s)) if s == target else None for s in ctx.slots]

    def gradient_form(self, op, slots, meta) -> bool:
        # y is linear in the normalised operand with the scale fixed (x * g, x / g), but not in a divisor
        target = meta.get("normalizer_slot", slots[0] if slots else None)
        spec = lookup(op)
        return target is not None and (spec is None or spec.kind != "div" or target == (0,))

    def gradient(self, ctx: RuleContext):
        """``G_x = J_x^T G`` with the other operand (the scale) held constant."""
        target = ctx.meta.get("normalizer_slot", ctx.slots[0])
        (g,) = ctx.vjp([target], ctx.relevances)
        return [g if s == target else None for s in ctx.slots]


class Numerator(NormalizerIdentity):
    r"""Division by a data tensor that is not a detected normaliser: all relevance to the numerator if it is
    data (``R_a = R``, the divisor is treated as a constant scale), else to the divisor (a unary function)."""

    name = "numerator"
    classes = frozenset({"div"})


class EmbeddingRows(Rule):
    r"""Embedding lookup ``E[ids]``: the relevance of the looked-up rows, summed over the hidden dimension, is
    the relevance of each index (one value per token): :math:`R_{ids} = \sum_d R_{\cdot, d}`."""

    name = "embedding_rows"
    conservative = True
    classes = frozenset({"embedding"})

    def relevance(self, ctx: RuleContext):
        r = ctx.relevances[0]
        res = []
        for s in ctx.slots:
            v = ctx.value(s)
            if v.dtype.is_floating_point:
                res.append(None)
            else:
                extra = r.ndim - v.ndim
                res.append(r.sum(tuple(range(v.ndim, v.ndim + extra))) if extra > 0 else r)
        return res


class NoRelevance(Rule):
    """No relevance flows to any operand (integer/bool values, statistics). Whatever arrives is absorbed."""

    name = "none"
    conservative = False
    classes = frozenset({"none"})

    def relevance(self, ctx: RuleContext):
        return [None] * len(ctx.slots)
