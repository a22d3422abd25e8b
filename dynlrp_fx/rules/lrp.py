r"""The LRP rule library beyond the basic rules: Zennit's parameter-modifying rules, pass-through, CP-LRP for
bilinear products, DynamicLRP's absolute-value split and gradient x input.

Zennit expresses every rule with one mechanism (``BasicHook``): re-run the layer with modified inputs and
parameters, divide the output relevance by a (stabilised) modified output, pull it back with the gradient of the
modified layer and reduce. Here a "layer" is an ATen op that is linear in its one data operand ``x`` given a
*weight* operand ``W`` (the non-data factor of ``convolution``, ``addmm``, ``mm``, ``bmm``, ``mul``) and possibly
an additive *bias* ``b``. :func:`linear_parts` finds the three, and :func:`modified` re-runs the op with
``(x', W', b')`` and returns the output and its pullback ``v -> J_{x'}^T v`` (the op is linear in ``x``, so the
pullback is the transposed op with the modified weights ``W'``).

Notation: ``z = f(x; W, b)`` the op output, ``R`` its relevance, ``t^+ = max(t, 0)``, ``t^- = min(t, 0)``,
``f(x; W, b)^T v`` the pullback (``W'^T v`` for a dense layer), ``stab(t) = t + eps (sign(t) + [t == 0])``.

Ops without a weight operand (``sum``, ``mean``, ``avg_pool``, ``add`` of two data tensors, a data tensor plus a
constant) have no parameters to modify: the weight-modifying rules (gamma, z+, alpha-beta, z^B, flat, w^2) fall
back to the epsilon rule with their stabiliser there (Zennit's ``Norm`` rule, which Zennit itself applies to sum
and average pooling), so assigning them by module type only changes the convolution or matmul of the module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .base import Rule, RuleContext, Slot, batched_matmul, nonnegative_number, safe_divide, stabilize
from .core import LINEAR, Epsilon, Route, _dot, _sum_to, bias_like_output, scaled
from .table import lookup

__all__ = [
    "LinearParts",
    "linear_parts",
    "modified",
    "Gamma",
    "ZPlus",
    "AlphaBeta",
    "ZBox",
    "Flat",
    "WSquare",
    "Pass",
    "CPBilinear",
    "AbsProportional",
    "GradientTimesInput",
]

@dataclass
class LinearParts:
    """The data operand, weight and bias of an op that is linear in one data operand."""

    x_slot: Slot
    w_slot: Slot
    b_slot: Slot | None
    x: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor | None


def linear_parts(ctx: RuleContext) -> LinearParts | None:
    """Split a ``linear``-class op into ``(x, W, b)``; ``None`` when it has no weight operand.

    The op must have exactly one data operand, which is a multiplicative factor, and one non-data tensor factor
    (the weight). The bias is the op table's :attr:`~dynlrp_fx.rules.table.OpSpec.bias` operand (``convolution``,
    ``addmm``, ``baddbmm``).
    """
    spec = lookup(ctx.op)
    if spec is None or spec.kind != "multilinear" or len(ctx.slots) != 1 or ctx.multi:
        return None
    (xs,) = ctx.slots
    if xs[0] not in spec.factors or len(xs) != 1:
        return None
    w_slots = [(i,) for i in spec.factors if (i,) != xs and isinstance(ctx.args[i], torch.Tensor)]
    if len(w_slots) != 1:
        return None
    bpos = spec.bias
    b = ctx.args[bpos] if bpos is not None and bpos < len(ctx.args) else None
    b_slot = (bpos,) if isinstance(b, torch.Tensor) else None
    dt = ctx.dtype
    x = ctx.value(xs).to(dt)
    w = ctx.value(w_slots[0]).to(dt)
    return LinearParts(xs, w_slots[0], b_slot, x, w, b.to(dt) if b_slot is not None else None)


def modified(
    ctx: RuleContext, parts: LinearParts, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Re-run the op as ``f(x; w, b)`` (``b=None``: zero bias); returns the output and ``v -> f(.; w)^T v``."""
    replace: dict = {parts.w_slot: w}
    if parts.b_slot is not None:
        replace[parts.b_slot] = b if b is not None else torch.zeros_like(parts.b)

    def fn(x_):
        return ctx.call({**replace, parts.x_slot: x_})[0]

    out, pullback = torch.func.vjp(fn, x)
    return out, lambda v: pullback(v.to(out.dtype))[0]


def nonnegative_input(ctx: RuleContext, parts: LinearParts) -> bool:
    """True when the passes proved the data operand ``>= 0`` (e.g. a ReLU output): ``x^- = 0``, so the
    negative-input terms of gamma, z+ and alpha-beta vanish and need not be computed."""
    return parts.x_slot in ctx.meta.get("nonneg_slots", ())


def _positive_split(ctx: RuleContext, p: LinearParts):
    """For a non-negative input: ``z`` (the forward output), ``R``, ``pos = f(x; W^+, b^+)`` and the pullbacks of
    ``f(.; W^+)`` and ``f(.; W)``; the negative-weight part is ``z - pos``."""
    pos, pb_pos = modified(ctx, p, p.x, p.w.clamp(min=0), _pos(p.b))
    _, pb = modified(ctx, p, p.x, p.w, p.b)
    return ctx.outputs[0].to(pos.dtype), ctx.relevances[0].to(pos.dtype), pos, pb_pos, pb


class _ModifiedLinear(Rule):
    """Shared parts of the weight-modifying rules: fallback to epsilon for ops without a weight operand."""

    classes = frozenset({"linear"})
    conservative = False

    def __init__(self, stabilizer: float = 1e-6):
        self.stabilizer = nonnegative_number(stabilizer, f"{type(self).__name__}: stabilizer")

    def relevance(self, ctx: RuleContext):
        parts = linear_parts(ctx)
        if parts is None:
            return Epsilon(self.stabilizer).relevance(ctx)
        return [self._relevance(ctx, parts)]

    def _relevance(self, ctx: RuleContext, parts: LinearParts) -> torch.Tensor:
        raise NotImplementedError

    def _gradient(self, ctx: RuleContext, parts: LinearParts, ledger: bool) -> tuple[torch.Tensor, Any]:
        """``(G_x, absorbed)``; ``absorbed`` (``None`` unless ``ledger``) from :meth:`_absorbed`, computed before
        the pullbacks so that its terms die before them."""
        raise NotImplementedError

    def _absorbed(self, ctx: RuleContext, u: torch.Tensor, d: torch.Tensor, sd: torch.Tensor, biases: tuple):
        """The ledger entry ``u * (stab(d) - d) + sum_j a_j * b_j`` (see :meth:`gradient_and_absorbed`) for
        ``biases`` ``((a_j, b_j), ...)``: the pullback arguments ``a_j`` and the modified biases ``b_j``."""
        keep = ctx.meta.get("batch_dim")
        total = _dot(u, sd - d, keep)
        for a, b in biases:
            if b is not None:
                total = total + _dot(a, bias_like_output(ctx, b), keep)
        return total

    def gradient(self, ctx: RuleContext):
        """The rule in gradient form (see :meth:`Rule.gradient`), where :meth:`gradient_form` says it has one: a
        rule whose relevance on a non-negative input is ``x * c`` returns ``c`` (no product with ``x`` here and no
        division by it at the next op); ops without a weight operand take epsilon's gradient form."""
        parts = linear_parts(ctx)
        if parts is None:
            return Epsilon(self.stabilizer).gradient(ctx)
        return [self._gradient(ctx, parts, False)[0]]

    def absorbed_form(self, op: Any) -> bool:
        # asked only where gradient_form holds (pair): the non-negative-input paths, whose terms give the entry
        del op
        return True

    def gradient_and_absorbed(self, ctx: RuleContext) -> tuple[list, torch.Tensor]:
        """:meth:`gradient` and what the application absorbed, read from the output side (as
        :meth:`Epsilon.gradient_and_absorbed`): the output's relevance is ``r = z * G = u * stab(d)`` and, each
        modified op being linear in ``x`` plus its bias, the input's is ``sum_j a_j * (z'_j - b_j) = u * d +
        sum_j a_j * b_j`` (Euler), so the entry is ``u * (stab(d) - d) + sum_j a_j * b_j``: no product with ``x``
        after the pullbacks, so ``x`` need not outlive them (summed over every dim but ``ctx.meta["batch_dim"]``)."""
        parts = linear_parts(ctx)
        if parts is None:
            return Epsilon(self.stabilizer).gradient_and_absorbed(ctx)
        gx, absorbed = self._gradient(ctx, parts, True)
        return [gx], absorbed


def _nonneg_slot(slots, meta: dict) -> bool:
    """One data operand, proved non-negative by the passes (``nonneg_slots``)."""
    return len(slots) == 1 and slots[0] in meta.get("nonneg_slots", ())


def _pos(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clamp(min=0)


def _neg(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clamp(max=0)


class Gamma(_ModifiedLinear):
    r"""Generalised LRP-gamma (Montavon et al. 2019; Andéol et al. 2021), exactly as Zennit's ``Gamma``.

    With ``W_+^\gamma = W + \gamma W^+`` and ``W_-^\gamma = W + \gamma W^-`` (each keeps *both* signs of ``W``),
    positive outputs ``z > 0`` are explained by the contributions that push up and negative ones by those that
    push down:

    .. math::
        u^+ &= [z > 0]\, R / \mathrm{stab}\big(f(x^+; W_+^\gamma, b + \gamma b^+) + f(x^-; W_-^\gamma, 0)\big) \\
        u^- &= [z < 0]\, R / \mathrm{stab}\big(f(x^+; W_-^\gamma, b + \gamma b^-) + f(x^-; W_+^\gamma, 0)\big) \\
        R_x &= x^+ \odot (W_+^{\gamma\,T} u^+ + W_-^{\gamma\,T} u^-) + x^- \odot (W_-^{\gamma\,T} u^+ + W_+^{\gamma\,T} u^-)

    For non-negative inputs (after ReLU) and ``z > 0`` this is the original gamma rule
    ``R_i = \sum_j x_i (w_{ij} + \gamma w_{ij}^+) / \sum_i x_i (w_{ij} + \gamma w_{ij}^+) R_j``; ``gamma = 0`` is
    LRP-0 (with the stabiliser). Ops without a weight operand: epsilon (see the module doc).

    Inputs proved non-negative (``x^- = 0``) take a fast path with the same values: with
    ``p = f(x; W^+, b^+)`` and the forward output ``z``, the two denominators are ``z + \gamma p`` and
    ``z + \gamma (z - p)``, and ``R_x = x \odot (W^T (u^+ + (1+\gamma) u^-) + \gamma W^{+T} (u^+ - u^-))``:
    one extra op and two pullbacks instead of four of each. Where the passes also proved that the output's relevance
    is zero wherever ``z <= 0`` (``ctx.meta["relevance_where_positive"]``: a ReLU follows and what reads its output
    gives relevance in proportion to it), ``u^- = 0`` and ``R_x = x \odot W_+^{\gamma\,T} u^+`` with the
    denominator ``f(x; W_+^\gamma, b + \gamma b^+)``: one extra op and one pullback, the cost of a gradient's.
    """

    name = "gamma"
    input_proportional = True  # every term is x^+ * (...) or x^- * (...)

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6):
        super().__init__(stabilizer)
        self.gamma = nonnegative_number(gamma, f"{type(self).__name__}: gamma")

    def _relevance(self, ctx: RuleContext, p: LinearParts) -> torch.Tensor:
        g = self.gamma
        x, w, b = p.x, p.w, p.b
        if nonnegative_input(ctx, p) and ctx.meta.get("relevance_where_positive"):
            # the passes proved R = 0 wherever z <= 0 (a ReLU follows): u^- = 0 and [z > 0] R = R, so
            # R_x = x * W_+^{gamma T} (R / stab(f(x; W_+^gamma, b + gamma b^+))): one op and one pullback
            zg, pb = modified(ctx, p, x, w + g * w.clamp(min=0), None if b is None else b + g * b.clamp(min=0))
            return x * pb(ctx.relevances[0].to(zg.dtype) / stabilize(zg, self.stabilizer))
        if nonnegative_input(ctx, p):
            z, r, pos, pb_pos, pb = _positive_split(ctx, p)
            up = (z > 0).to(r.dtype) * r / stabilize(z + g * pos, self.stabilizer)
            un = (z < 0).to(r.dtype) * r / stabilize(z + g * (z - pos), self.stabilizer)
            return x * (pb(up + (1 + g) * un) + pb_pos(g * (up - un)))
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        wp, wn = w + g * w.clamp(min=0), w + g * w.clamp(max=0)
        bp = None if b is None else b + g * b.clamp(min=0)
        bn = None if b is None else b + g * b.clamp(max=0)
        z0, pb0 = modified(ctx, p, xp, wp, bp)
        z1, pb1 = modified(ctx, p, xn, wn, None)
        z2, pb2 = modified(ctx, p, xp, wn, bn)
        z3, pb3 = modified(ctx, p, xn, wp, None)
        z = ctx.outputs[0].to(z0.dtype)
        r = ctx.relevances[0].to(z0.dtype)
        up = (z > 0).to(r.dtype) * r / stabilize(z0 + z1, self.stabilizer)
        un = (z < 0).to(r.dtype) * r / stabilize(z2 + z3, self.stabilizer)
        return xp * (pb0(up) + pb2(un)) + xn * (pb1(up) + pb3(un))

    def gradient_form(self, op, slots, meta) -> bool:
        # the non-negative-input paths are x * (...): their G is the (...) (see _ModifiedLinear.gradient)
        return _nonneg_slot(slots, meta)

    def _gradient(self, ctx: RuleContext, p: LinearParts, ledger: bool) -> tuple[torch.Tensor, Any]:
        """``G_x`` with ``R_x = x * G_x`` on a non-negative input, from ``G`` (``R = z * G``): the two fast paths
        of :meth:`_relevance` without the final product with ``x``; and the ledger entry."""
        g = self.gamma
        x, w, b = p.x, p.w, p.b
        r = ctx.outputs[0].to(x.dtype) * ctx.relevances[0].to(x.dtype)
        if ctx.meta.get("relevance_where_positive"):
            bg = None if b is None else b + g * b.clamp(min=0)
            zg, pb = modified(ctx, p, x, w + g * w.clamp(min=0), bg)
            sd = stabilize(zg, self.stabilizer)
            u = r / sd
            absorbed = self._absorbed(ctx, u, zg, sd, ((u, bg),)) if ledger else None
            return pb(u), absorbed
        z, _, pos, pb_pos, pb = _positive_split(ctx, p)
        # u^+ and u^- live where z > 0 and z < 0, and r = z * G is 0 where z = 0, so one quotient u on one
        # denominator d serves both: d = z + g * q with q = pos where z > 0 and z - pos where z < 0, i.e.
        # q = 2 * pos^{z>0} + min(z, 0) - pos; the pullbacks read u * (1 + g [z < 0]) = (1 + g) u - g u^{z>0} and
        # g (u^{z>0} - u^{z<0}) = -g (u - 2 u^{z>0}). ``t^{z>0}`` (t where z > 0, else 0) is threshold_backward,
        # a branch-free kernel: on CPU a where() or a comparison on a random sign pattern costs 4-20 times as much
        # as an add (benchmarks/results/tuning_notes.md)
        # (ledger: a1 * z + a2 * pos = u * d on both sides, so the terms are those of one modified op)
        pos_up = torch.ops.aten.threshold_backward(pos, z, 0)
        q = torch.add(z.clamp(max=0), pos_up, alpha=2) - pos
        d = torch.add(z, q, alpha=g)
        sd = stabilize(d, self.stabilizer)
        u = r / sd
        u_up = torch.ops.aten.threshold_backward(u, z, 0)
        a1, a2 = torch.add(u * (1 + g), u_up, alpha=-g), torch.add(u, u_up, alpha=-2) * -g
        absorbed = self._absorbed(ctx, u, d, sd, ((a1, b), (a2, _pos(b)))) if ledger else None
        return pb(a1) + pb_pos(a2), absorbed


class ZPlus(_ModifiedLinear):
    r"""LRP-z+ (Zennit's ``ZPlus``: alpha=1, beta=0 with negative inputs allowed):

    .. math::  u = R / \mathrm{stab}\big(f(x^+; W^+, b^+) + f(x^-; W^-, 0)\big), \qquad
               R_x = x^+ \odot W^{+T} u + x^- \odot W^{-T} u

    Only the positive contributions ``x_i^+ w_{ij}^+`` and ``x_i^- w_{ij}^-`` receive relevance. Inputs proved
    non-negative skip the ``x^-`` terms (one op and one pullback).
    """

    name = "zplus"
    input_proportional = True  # every term is x^+ * (...) or x^- * (...)

    def gradient_form(self, op, slots, meta) -> bool:
        return _nonneg_slot(slots, meta)

    def _gradient(self, ctx: RuleContext, p: LinearParts, ledger: bool) -> tuple[torch.Tensor, Any]:
        """``G_x = W^{+T} (z * G / stab(z^+))`` on a non-negative input, and the ledger entry."""
        bp = _pos(p.b)
        z0, pb0 = modified(ctx, p, p.x, p.w.clamp(min=0), bp)
        r = ctx.outputs[0].to(z0.dtype) * ctx.relevances[0].to(z0.dtype)
        sd = stabilize(z0, self.stabilizer)
        u = r / sd
        absorbed = self._absorbed(ctx, u, z0, sd, ((u, bp),)) if ledger else None  # before the pullback
        return pb0(u), absorbed

    def _relevance(self, ctx: RuleContext, p: LinearParts) -> torch.Tensor:
        x, w, b = p.x, p.w, p.b
        if nonnegative_input(ctx, p):
            z0, pb0 = modified(ctx, p, x, w.clamp(min=0), _pos(b))
            return x * pb0(ctx.relevances[0].to(z0.dtype) / stabilize(z0, self.stabilizer))
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        z0, pb0 = modified(ctx, p, xp, w.clamp(min=0), _pos(b))
        z1, pb1 = modified(ctx, p, xn, w.clamp(max=0), None)
        u = ctx.relevances[0].to(z0.dtype) / stabilize(z0 + z1, self.stabilizer)
        return xp * pb0(u) + xn * pb1(u)


class AlphaBeta(_ModifiedLinear):
    r"""LRP-alpha-beta (Bach et al. 2015), as Zennit's ``AlphaBeta`` (``alpha - beta = 1``, both >= 0):

    .. math::
        u^+ &= R / \mathrm{stab}\big(f(x^+; W^+, b^+) + f(x^-; W^-, 0)\big), \quad
        u^- = R / \mathrm{stab}\big(f(x^+; W^-, b^-) + f(x^-; W^+, 0)\big) \\
        R_x &= \alpha\,(x^+ \odot W^{+T} u^+ + x^- \odot W^{-T} u^+) - \beta\,(x^+ \odot W^{-T} u^- + x^- \odot W^{+T} u^-)

    Positive contributions share ``alpha R``, negative ones ``-beta R`` (conservative up to bias and stabiliser).
    Inputs proved non-negative take a fast path with the same values: with ``p = f(x; W^+, b^+)`` the
    denominators are ``p`` and ``z - p``, and ``R_x = x \odot (W^{+T}(\alpha u^+ + \beta u^-) - \beta W^T u^-)``.
    """

    name = "alpha_beta"
    input_proportional = True  # every term is x^+ * (...) or x^- * (...)

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6):
        if alpha < 0 or beta < 0:
            raise ValueError(f"AlphaBeta: alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
        if not math.isclose(alpha - beta, 1.0):
            raise ValueError(f"AlphaBeta: alpha - beta must equal 1, got alpha={alpha}, beta={beta}")
        super().__init__(stabilizer)
        self.alpha = float(alpha)
        self.beta = float(beta)

    def _relevance(self, ctx: RuleContext, p: LinearParts) -> torch.Tensor:
        x, w, b = p.x, p.w, p.b
        if nonnegative_input(ctx, p):
            z, r, pos, pb_pos, pb = _positive_split(ctx, p)
            up = r / stabilize(pos, self.stabilizer)
            un = r / stabilize(z - pos, self.stabilizer)
            return x * (pb_pos(self.alpha * up + self.beta * un) - self.beta * pb(un))
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        z0, pb0 = modified(ctx, p, xp, wp, _pos(b))
        z1, pb1 = modified(ctx, p, xn, wn, None)
        z2, pb2 = modified(ctx, p, xp, wn, _neg(b))
        z3, pb3 = modified(ctx, p, xn, wp, None)
        r = ctx.relevances[0].to(z0.dtype)
        up = r / stabilize(z0 + z1, self.stabilizer)
        un = r / stabilize(z2 + z3, self.stabilizer)
        pos = xp * pb0(up) + xn * pb1(up)
        neg = xp * pb2(un) + xn * pb3(un)
        return self.alpha * pos - self.beta * neg


def _bound(value: Any) -> tuple[tuple, list] | float:
    """Store a bound as a float, or as (shape, values) so the rule never holds a tensor (fake-mode safe)."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return float(value.reshape(()).item())
        return (tuple(value.shape), value.detach().double().flatten().tolist())
    return float(value)


def _expand_bound(bound: tuple[tuple, list] | float, x: torch.Tensor, what: str) -> torch.Tensor:
    if isinstance(bound, float):
        return torch.full_like(x, bound)
    shape, values = bound
    t = x.new_tensor(values).reshape(shape)
    if t.ndim == 1 and x.ndim >= 2 and t.shape[0] == x.shape[1]:
        t = t.reshape((1, -1) + (1,) * (x.ndim - 2))  # per-channel bound
    try:
        return t.expand_as(x)
    except RuntimeError:
        raise ValueError(
            f"ZBox: the {what} bound of shape {tuple(shape)} does not broadcast to the first layer's input of shape "
            f"{tuple(x.shape)}; give a scalar, a per-channel tensor of length {x.shape[1] if x.ndim > 1 else '?'} or a "
            "tensor broadcastable to the input (e.g. (1, C, 1, 1))"
        ) from None


class ZBox(_ModifiedLinear):
    r"""LRP-z^B (Montavon et al. 2017) for bounded inputs ``low <= x <= high`` (Zennit's ``ZBox``):

    .. math::
        u &= R / \mathrm{stab}\big(f(x; W, b) - f(l; W^+, b^+) - f(h; W^-, b^-)\big) \\
        R_x &= x \odot W^T u - l \odot W^{+T} u - h \odot W^{-T} u

    (the biases cancel in the denominator: ``b - b^+ - b^- = 0``). ``low`` / ``high``: scalars, per-channel
    tensors of length ``C`` or tensors broadcastable to the input (e.g. ``(1, C, 1, 1)``). Use it for the first
    layer, on pixels.
    """

    name = "zbox"

    def __init__(self, low: Any, high: Any, stabilizer: float = 1e-6):
        super().__init__(stabilizer)
        self.low = _bound(low)
        self.high = _bound(high)

    def _relevance(self, ctx: RuleContext, p: LinearParts) -> torch.Tensor:
        x, w, b = p.x, p.w, p.b
        lo = _expand_bound(self.low, x, "low")
        hi = _expand_bound(self.high, x, "high")
        z0, pb0 = modified(ctx, p, x, w, b)
        z1, pb1 = modified(ctx, p, lo, w.clamp(min=0), _pos(b))
        z2, pb2 = modified(ctx, p, hi, w.clamp(max=0), _neg(b))
        u = ctx.relevances[0].to(z0.dtype) / stabilize(z0 - z1 - z2, self.stabilizer)
        return x * pb0(u) - lo * pb1(u) - hi * pb2(u)


class Flat(_ModifiedLinear):
    r"""LRP-flat (Lapuschkin et al. 2019; Zennit's ``Flat``): inputs and weights set to one, bias to zero:

    .. math::  R_x = \mathbf{1}^T \big(R / \mathrm{stab}(f(\mathbf{1}; \mathbf{1}, 0))\big)

    i.e. each output's relevance is spread uniformly over its receptive field (``R_i = \sum_j R_j / n_j``).
    """

    name = "flat"

    def _relevance(self, ctx: RuleContext, p: LinearParts) -> torch.Tensor:
        z, pb = modified(ctx, p, torch.ones_like(p.x), torch.ones_like(p.w), None)
        return pb(ctx.relevances[0].to(z.dtype) / stabilize(z, self.stabilizer))


class WSquare(_ModifiedLinear):
    r"""LRP-w^2 (Montavon et al. 2017; Zennit's ``WSquare``, which squares every parameter, the bias included):

    .. math::  R_x = (W^{\odot 2})^T \big(R / \mathrm{stab}(f(\mathbf{1}; W^{\odot 2}, b^{\odot 2}))\big)

    A first-layer rule for unbounded inputs: relevance is spread by squared weights, independent of ``x``.
    """

    name = "wsquare"

    def _relevance(self, ctx: RuleContext, p: LinearParts) -> torch.Tensor:
        b2 = None if p.b is None else p.b**2
        z, pb = modified(ctx, p, torch.ones_like(p.x), p.w**2, b2)
        return pb(ctx.relevances[0].to(z.dtype) / stabilize(z, self.stabilizer))


class Pass(Rule):
    r"""Pass-through (Zennit's ``Pass``): the output relevance goes unchanged to the first data operand,
    :math:`R_x = R` (summed over broadcast dimensions). Zennit's composites use it for activations and batch
    norm (an un-merged batch norm is skipped, its shift and scale absorb nothing)."""

    name = "pass"
    conservative = True
    classes = frozenset({"linear", "identity", "layernorm", "normalizer", "div"})

    def relevance(self, ctx: RuleContext):
        res: list = [None] * len(ctx.slots)
        if ctx.slots:
            res[0] = _sum_to(ctx.relevances[0], ctx.value(ctx.slots[0])).to(ctx.dtype)
        return res


class CPBilinear(Rule):
    r"""CP-LRP (Ali et al. 2022) for a product of two data tensors written as a matmul (decomposed attention,
    ``o = p @ v``): the attention weights ``p`` are treated as a constant, so all relevance goes to ``v``:

    .. math::  R_v = v \odot p^T \big(R / \mathrm{stab}(o)\big), \qquad R_p = 0

    and nothing reaches the softmax, the query or the key. The constant operand is the one in
    ``ctx.meta["attention_probs_slot"]`` when a pass marked it, else the first factor (``p @ v``, the order used
    by every attention implementation; a ``q @ k^T`` product receives no relevance under CP-LRP anyway).
    """

    name = "cp_bilinear"
    conservative = False
    classes = frozenset({"bilinear"})

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = nonnegative_number(epsilon, f"{type(self).__name__}: epsilon")

    def relevance(self, ctx: RuleContext):
        keep = _cp_kept(ctx)
        if keep is None:
            return Epsilon(self.epsilon).relevance(ctx)
        u = [safe_divide(r, z, self.epsilon) for r, z in zip(ctx.relevances, ctx.outputs)]
        grads = dict(zip(keep, ctx.vjp(keep, u)))
        return [ctx.surrogate(s) * grads[s] if s in grads else None for s in ctx.slots]

    def gradient_form(self, op, slots, meta) -> bool:
        return True

    def gradient(self, ctx: RuleContext):
        """``G_v = J_v^T (G * z / stab(z))`` with the attention weights held constant."""
        keep = _cp_kept(ctx)
        if keep is None:
            return Epsilon(self.epsilon).gradient(ctx)
        u = [scaled(g, z, self.epsilon) for g, z in zip(ctx.relevances, ctx.outputs)]
        grads = dict(zip(keep, ctx.vjp(keep, u)))
        return [grads.get(s) for s in ctx.slots]


def _cp_kept(ctx: RuleContext) -> list | None:
    """The slots of a two-factor product that take relevance under CP-LRP (all but the attention weights), or
    ``None`` when fewer than two factors carry data (then the plain epsilon rule applies)."""
    factors = [s for s in ctx.slots if s in ctx.factors]
    if len(factors) < 2:
        return None
    const = ctx.meta.get("attention_probs_slot", factors[0])
    return [s for s in ctx.slots if s != const]


class AbsProportional(Rule):
    r"""DynamicLRP's split for sums (Lee & Arias 2025): each summand gets relevance in proportion to its
    magnitude,

    .. math::  R_{a} = R \odot \frac{|a|}{|a| + |\alpha b|}, \quad R_{b} = R \odot \frac{|\alpha b|}{|a| + |\alpha b|}

    for ``add``/``sub`` (``alpha`` the op's scale; a constant summand such as a bias takes its share, which is
    absorbed), and :math:`R_{x_i} = |x_i| / \sum_{j} |x_j| \cdot R` for ``sum``/``mean`` over the reduced
    dimensions. ``R / 0 := 0`` where every summand is zero. Other linear ops: epsilon with ``epsilon``.
    """

    name = "abs_proportional"
    conservative = False
    classes = LINEAR

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = nonnegative_number(epsilon, f"{type(self).__name__}: epsilon")

    def relevance(self, ctx: RuleContext):
        name = getattr(ctx.op, "_opname", "")
        if name in ("add", "sub") and ctx.op.overloadpacket in (torch.ops.aten.add, torch.ops.aten.sub):
            dt = ctx.dtype
            a = ctx.args[0]
            b = ctx.args[1] if len(ctx.args) > 1 else 0.0
            alpha = ctx.kwargs.get("alpha", 1)
            aa = a.to(dt).abs() if isinstance(a, torch.Tensor) else torch.tensor(abs(float(a)), dtype=dt)
            bb = (
                (b.to(dt) * alpha).abs()
                if isinstance(b, torch.Tensor)
                else torch.tensor(abs(float(b) * alpha), dtype=dt)
            )
            r = ctx.relevances[0]
            u = safe_divide(r, aa + bb, 0.0)
            share = {(0,): aa, (1,): bb}
            return [_sum_to(share[s] * u, ctx.value(s)) if s in share else None for s in ctx.slots]
        if name in ("sum", "mean") and len(ctx.slots) == 1:
            (s,) = ctx.slots
            xa = ctx.surrogate(s).abs()
            za, pb = torch.func.vjp(lambda t: ctx.call({s: t})[0], xa)
            (g,) = pb(safe_divide(ctx.relevances[0].to(za.dtype), za, 0.0))
            return [xa * g]
        return Epsilon(self.epsilon).relevance(ctx)


def _sdpa_math(ctx: RuleContext):
    """Math form of ``scaled_dot_product_attention`` over (q, k, v) with the op's mask/causal/scale/GQA."""
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal"]
    vals = dict(zip(names, ctx.args))
    vals.update({k: v for k, v in ctx.kwargs.items() if k in names})
    mask = vals.get("attn_mask")
    is_causal = bool(vals.get("is_causal", False))
    scale = ctx.kwargs.get("scale")
    gqa = bool(ctx.kwargs.get("enable_gqa", False))

    def fn(q, k, v):
        s_ = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
        if gqa and k.size(-3) != q.size(-3):
            k = k.repeat_interleave(q.size(-3) // k.size(-3), -3)
            v = v.repeat_interleave(q.size(-3) // v.size(-3), -3)
        s = batched_matmul(q, k.transpose(-2, -1)) * s_
        L, S = s.size(-2), s.size(-1)
        if is_causal:
            keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(diagonal=S - L if L != S else 0)
            s = s.masked_fill(~keep, float("-inf"))
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(s.dtype)
        # a query whose every key is masked gets weights 0, as in SDPA (torch's safe softmax), not 0/0 = NaN
        p = torch.where(torch.isneginf(s).all(-1, keepdim=True), 0.0, torch.softmax(s, -1))
        return batched_matmul(p, v)

    return fn


class GradientTimesInput(Rule):
    r"""Gradient x input, expressed as relevance: every op applies LRP-0 linearised at its output,

    .. math::  R_k = x_k \odot J_k^T \big(R / z\big)\quad (R / z := 0 \text{ where } z = 0)

    By induction ``R_z = z \odot \partial y / \partial z`` at every value (it holds at the seed ``y_t``), so
    ``R_x = x \odot \partial y_t / \partial x``: gradient x input, for any differentiable op (ReLU, GELU,
    LayerNorm, softmax, attention, ...). Route ops (and integer index values) use :class:`Route`. The only
    approximation is at intermediate values that are exactly zero with a non-zero gradient, where the gradient
    cannot be recovered from ``R = z * g = 0``; in floating point this has measure zero. ``R_k = 0`` wherever the
    gradient is zero, also for infinite values (masked attention logits).
    """

    name = "gradient"
    conservative = False
    classes = frozenset(
        {"linear", "bilinear", "product", "identity", "softmax", "layernorm", "normalizer", "div", "sdpa", "route"}
    )

    def relevance(self, ctx: RuleContext):
        spec = lookup(ctx.op)
        if spec is not None and spec.kind == "route":
            return Route().relevance(ctx)
        u = [safe_divide(r, z.to(r.dtype), 0.0) for r, z in zip(ctx.relevances, ctx.outputs)]
        fn = None
        if spec is not None and spec.kind == "sdpa":
            math_fn = _sdpa_math(ctx)
            slots = {(0,): 0, (1,): 1, (2,): 2, ("kw", "query"): 0, ("kw", "key"): 1, ("kw", "value"): 2}
            qkv = [ctx.value(s) for s in [(0,), (1,), (2,)]]

            def fn(*xs):
                args = list(qkv)
                for s, x in zip(ctx.slots, xs):
                    args[slots[s]] = x
                return (math_fn(*args),)

        grads = ctx.vjp(ctx.slots, u, fn=fn)
        out = []
        for s, g in zip(ctx.slots, grads):
            v = ctx.value(s)
            # 0 where the gradient is 0: an infinite value (an additive -inf attention mask) times a zero gradient
            # is 0 here, as in autograd, which never multiplies by the value, not NaN
            out.append(torch.where(g == 0, 0.0, v.to(g.dtype) * g) if v.dtype.is_floating_point else None)
        return out
