"""Rule mechanism: a :class:`RuleContext` describes one ATen op application; a :class:`Rule` maps the
relevance of the op's output(s) to relevance of its *data* operands.

Rules are ordinary PyTorch code. They run once at compile time under ``make_fx`` (which records the ATen ops
they call, including the derivative formulas behind :meth:`RuleContext.vjp`), so a rule costs nothing in Python
at explanation time.

Notation used in the rule docstrings: ``z = f(x_1, ..., x_n)`` is the op's output, ``R`` its relevance,
``J_k`` the Jacobian of ``f`` w.r.t. data operand ``x_k`` and ``J_k^T v`` the vector-Jacobian product
(``torch.func.vjp``). ``stab(z) = z + eps * (sign(z) + [z == 0])`` is Zennit's stabiliser.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "Slot",
    "RuleContext",
    "Rule",
    "stabilize",
    "safe_divide",
    "divide_zero_at_zero",
    "nan_to_zero",
    "batched_matmul",
    "nonnegative_number",
]

#: an operand position: ``(i,)`` for ``args[i]``, ``(i, j)`` for ``args[i][j]`` (tensor lists), ``("kw", name)``.
Slot = tuple


def nonnegative_number(value: Any, what: str) -> float:
    """``float(value)`` for a rule parameter that must be a finite number ``>= 0`` (an epsilon, a stabiliser, a
    gamma); ``ValueError`` naming the parameter otherwise (a NaN epsilon would make every relevance NaN)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number >= 0, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return v


def stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Zennit's stabiliser: ``z + eps * (sign(z) + [z == 0])`` (moves zeros to ``+eps``).

    Written as ``copysign(eps, z + 0.0) + z`` (``eps`` in ``z``'s dtype; ``z + 0.0`` turns ``-0.0`` into
    ``+0.0``, so both zeros move to ``+eps`` as in Zennit): the same values as ``where(z >= 0, eps, -eps) + z``,
    one fused pointwise op when compiled, and in eager execution one ``z``-sized temporary that the following ops
    overwrite (:func:`~dynlrp_fx.passes.reuse_buffers.reuse_buffers`). Not ``where``: its CPU kernel is several
    times slower than ``copysign`` on activation-sized tensors (``benchmarks/results/tuning_notes.md``).
    """
    return torch.copysign(z.new_full((), eps), z + 0.0) + z


def safe_divide(num: torch.Tensor, den: torch.Tensor, eps: float) -> torch.Tensor:
    """``num / stab(den)``; with ``eps == 0`` this is ``num / den`` where ``den != 0`` and ``0`` elsewhere.

    The ``eps == 0`` form is exact LRP-0: on piecewise-linear networks ``den == 0`` implies ``num == 0``.
    """
    if eps == 0:
        # the quotient is inf/NaN where den == 0 and not selected there (three passes; nothing differentiates it)
        return torch.where(den == 0, 0.0, num / den)
    return num / stabilize(den, eps)


def nan_to_zero(t: torch.Tensor) -> torch.Tensor:
    """``t`` with NaN replaced by 0 and infinities kept (``0 / 0`` or ``0 * inf`` read as 0)."""
    return torch.nan_to_num(t, nan=0.0, posinf=math.inf, neginf=-math.inf)


def divide_zero_at_zero(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den != 0`` and ``0`` elsewhere, for ``num`` that is zero wherever ``den`` is (``f(x) / x``
    with ``f(0) = 0``): there the quotient is ``0 / 0 = NaN``, and one ``nan_to_num`` pass replaces it. The same
    values as :func:`safe_divide` with ``eps = 0`` (infinities are kept), without its ``den == 0`` mask and ``where``:
    on this CPU each of those costs about five times the division (``benchmarks/results/tuning_notes.md``)."""
    return nan_to_zero(num / den)


def batched_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for ``[..., L, E] x [..., E, S]`` with equal batch dims, as one ``bmm`` over the flattened batch.

    Rules use it instead of ``@``: on torch < 2.13 the ``matmul`` decomposition reads sizes as ints under fake
    tensors, which specialises the symbolic batch size of a compiled explainer to the example's.
    """
    lead = a.shape[:-2]
    out = torch.bmm(a.reshape(-1, a.shape[-2], a.shape[-1]), b.reshape(-1, b.shape[-2], b.shape[-1]))
    return out.reshape(*lead, a.shape[-2], b.shape[-1])


def _get(container: Any, slot: Slot, kwargs: dict) -> Any:
    if slot[0] == "kw":
        return kwargs[slot[1]]
    v = container[slot[0]]
    return v[slot[1]] if len(slot) > 1 else v


def _set(args: list, kwargs: dict, slot: Slot, value: Any) -> None:
    if slot[0] == "kw":
        kwargs[slot[1]] = value
    elif len(slot) > 1:
        lst = list(args[slot[0]])
        lst[slot[1]] = value
        args[slot[0]] = lst
    else:
        args[slot[0]] = value


def _copy(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    """``aten.copy(dst, src)`` (``src`` broadcast into ``dst``'s shape, as a new tensor) in ops that have derivative
    formulas: torch has none for the functional ``copy``, which export leaves for an in-place ``copy_`` (BART shifts
    its labels into decoder ids so). The values are the same; the dtype is the promotion of both, so that a float
    surrogate of integer ids stays differentiable."""
    del non_blocking
    return src.to(device=dst.device, dtype=torch.promote_types(dst.dtype, src.dtype)).expand(dst.shape).clone()


#: ops re-run by :meth:`RuleContext.call` through an equivalent that autograd can differentiate
_DIFFERENTIABLE: dict[Any, Callable] = {torch.ops.aten.copy.default: _copy}


class RuleContext:
    """One application of an ATen op, as seen by a rule.

    Attributes
    ----------
    op: the ATen ``OpOverload``.
    args, kwargs: the forward operands (tensors are the forward values bound by promises).
    out: the forward output (a tensor, or a tuple for multi-output ops).
    relevance: relevance of the output: a tensor, or for multi-output ops a tuple with ``None`` where an output
        receives no relevance.
    slots: the data operands that receive relevance, in order; a rule returns one tensor (or ``None``) per slot.
    factors: data slots that are multiplicative factors of a multilinear op (``mul``, ``mm``, ``conv``...).
    meta: extra per-node information from the passes (e.g. ``normalizer_slot``).
    """

    def __init__(
        self,
        op: Any,
        args: Sequence[Any],
        kwargs: dict,
        out: Any,
        relevance: Any,
        slots: Sequence[Slot],
        factors: Sequence[Slot] = (),
        meta: dict | None = None,
    ):
        self.op = op
        self.args = tuple(args)
        self.kwargs = dict(kwargs)
        self.out = out
        self.relevance = relevance
        self.slots = list(slots)
        self.factors = list(factors)
        self.meta = dict(meta or {})
        self.multi = isinstance(out, (tuple, list))
        if self.multi:
            self.out_index = [i for i, r in enumerate(relevance) if r is not None]
        else:
            self.out_index = None

    # -- values -------------------------------------------------------------------------------------------------
    def value(self, slot: Slot) -> Any:
        """The forward value of an operand."""
        return _get(self.args, slot, self.kwargs)

    @property
    def outputs(self) -> list[torch.Tensor]:
        """The op outputs that carry relevance."""
        if not self.multi:
            return [self.out]
        return [self.out[i] for i in self.out_index]

    @property
    def relevances(self) -> list[torch.Tensor]:
        """Relevance of each output in :attr:`outputs`."""
        if not self.multi:
            return [self.relevance]
        return [self.relevance[i] for i in self.out_index]

    @property
    def dtype(self) -> torch.dtype:
        return self.relevances[0].dtype

    def call(self, replace: dict[Slot, Any] | None = None, keep: bool = False) -> Any:
        """Re-run the op with some operands replaced; returns the outputs that carry relevance (a list).

        With ``keep=True`` the raw op result is returned instead.
        """
        args = list(self.args)
        kwargs = dict(self.kwargs)
        for s, v in (replace or {}).items():
            _set(args, kwargs, s, v)
        res = _DIFFERENTIABLE.get(self.op, self.op)(*args, **kwargs)
        if keep:
            return res
        if not self.multi:
            return [res]
        return [res[i] for i in self.out_index]

    def surrogate(self, slot: Slot) -> torch.Tensor:
        """The operand as a floating tensor of the relevance dtype (integer index operands included)."""
        v = self.value(slot)
        if not (v.dtype.is_floating_point or v.dtype.is_complex):
            return v.to(self.dtype)
        return v

    def vjp(self, slots: Sequence[Slot], cotangents: Sequence[torch.Tensor], fn: Callable | None = None) -> list:
        """Vector-Jacobian products ``J_k^T v`` of the op (other operands fixed) for each slot in ``slots``.

        ``cotangents`` align with :attr:`outputs`. Integer operands are differentiated through a float
        surrogate (valid for ops that route values, such as reshape or slice). An integer destination operand
        (operand 0, which sets the result dtype of ``slice_scatter``, ``copy``, ``index_put``...) that receives no
        relevance and has the dtype of a surrogate slot takes the surrogate's dtype too, so that the result stays
        differentiable (a ``where`` condition, a bool, is left alone).
        """
        slots = list(slots)
        primals = [self.surrogate(s) for s in slots]
        dst = self.args[0] if self.args else None
        cast_dst = (
            isinstance(dst, torch.Tensor) and (0,) not in slots
            and any(p.dtype != self.value(s).dtype == dst.dtype for s, p in zip(slots, primals))
        )
        if fn is None:

            def fn(*xs):
                replace = dict(zip(slots, xs))
                if cast_dst:
                    replace[(0,)] = dst.to(xs[0].dtype)
                return tuple(self.call(replace))

        outs, pullback = torch.func.vjp(fn, *primals)
        cots = tuple(c.to(o.dtype) if c.dtype != o.dtype else c for c, o in zip(cotangents, outs))
        grads = pullback(cots)
        return list(grads)


class Rule:
    """Base class of LRP rules.

    Subclasses implement :meth:`relevance`. ``conservative = True`` declares that the relevance of the data
    operands always sums to the relevance of the output (so the conservation ledger can skip the op).
    ``classes`` lists the rule classes (``"linear"``, ``"route"``...) a rule may be assigned to, so that a rule
    chosen for a module (e.g. gamma for ``nn.Conv2d``) only applies to the ops of that module it fits.
    ``input_proportional = True`` declares that the relevance a data operand receives is that operand times a finite
    factor (``R_x = x * c``), so it is zero wherever the operand is zero; the passes read it to prove where an op's
    output relevance vanishes (:func:`~dynlrp_fx.passes.nonnegative.relevance_only_where_positive`).
    """

    name: str = "rule"
    conservative: bool = False
    classes: frozenset = frozenset()
    input_proportional: bool = False

    def relevance(self, ctx: RuleContext) -> list[torch.Tensor | None]:
        raise NotImplementedError

    def gradient_form(self, op: Any, slots: Sequence[Slot], meta: dict) -> bool:
        """Whether the rule has a *gradient form* at an application of ``op`` (see :meth:`gradient`). The default,
        ``False``, keeps :meth:`relevance`; ``pair`` then hands the rule relevance and converts at its borders."""
        del op, slots, meta
        return False

    def gradient(self, ctx: RuleContext) -> list[torch.Tensor | None]:
        r"""The rule in gradient form: ``ctx.relevance`` holds ``G`` with ``R = out * G`` (per output), and the
        result is ``G_k`` per slot with ``R_k = x_k * G_k``; the same relevance as :meth:`relevance` wherever the
        values are non-zero. A program that carries ``G`` through a chain of such rules multiplies by the input once
        at the end instead of dividing by ``z`` and multiplying by ``x`` at every op: LRP-0 through linear maps and
        ReLUs is then exactly the gradient (``docs/design.md``, section 6, "Gradient form")."""
        raise NotImplementedError

    def absorbed_form(self, op: Any) -> bool:
        """Whether :meth:`gradient_and_absorbed` computes what an application of ``op`` absorbs from the output side
        (``G`` and the op's constants), so that the conservation ledger needs neither the operands nor ``R_out``
        there: the ledger then costs a reduction the sweep reads anyway instead of keeping (or recomputing) the
        op's input and output. ``False`` (the default): ``pair`` measures ``sum R_out - sum R_in``."""
        del op
        return False

    def gradient_and_absorbed(self, ctx: RuleContext) -> tuple[list, torch.Tensor]:
        """:meth:`gradient` and what the application absorbed, per output element or, with
        ``ctx.meta["batch_dim"]``, summed over every other dim (see :meth:`absorbed_form`)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(self)))
