"""Decompositions dynlrp adds to torch's tracing table: custom ops traced through, and ATen ops torch leaves whole.

:func:`extra_decompositions` is what :func:`dynlrp_fx.trace.decomposition_table` adds to torch's default table:
:data:`ATEN_DECOMPOSITIONS` (ATen ops outside Core ATen that torch does not decompose and whose derivative cannot
be traced with a symbolic batch, written in core ops) and :func:`custom_op_decompositions`.

Custom ops
----------

A custom op is opaque to the op table: relevance reaching it needs a rule (``dynlrp.register_op``). But most custom
ops that models use are made of torch ops (a library wraps a loop or a fused kernel in a custom op so that
``torch.compile`` does not look inside). :func:`custom_op_decompositions` gives the tracing table
(:func:`dynlrp_fx.trace.decomposition_table`) one entry per such op, which runs its implementation while
``run_decompositions`` traces, so the graph holds the ATen ops of the implementation, and those have rules.

* An op defined with ``torch.library.custom_op`` (found in torch's registry of custom-op definitions, not patched)
  is traced through its registered Python implementation (the kernel for the inputs' device, else the default one).
* :data:`LIBRARY_IMPLEMENTATIONS` holds traceable implementations of library ops whose own implementation cannot be
  traced with symbolic shapes (a Python loop over a tensor's values): ``transformers::grouped_mm_fallback``
  (Qwen3-MoE's and other mixture-of-experts models' expert matmuls in transformers 5).
* Ops left whole: ops with an op-table entry (a rule the user registered wins over tracing through), ops that
  mutate an argument, and ops whose implementation fails to trace (``.numpy()``, a branch on a tensor's value, no
  Python implementation): the decomposition returns ``NotImplemented``, the op stays in the graph, and compiling
  raises :class:`~dynlrp_fx.DynlrpUnsupportedOpError` naming it and its module path. A warning says why the
  implementation could not be traced.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["extra_decompositions", "custom_op_decompositions", "LIBRARY_IMPLEMENTATIONS", "ATEN_DECOMPOSITIONS",
           "grouped_mm", "trilinear"]


def grouped_mm(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``transformers::grouped_mm_fallback`` in core ATen ops with no data-dependent shapes.

    Rows ``offs[e-1]:offs[e]`` of ``input`` (S, I) are multiplied by ``weight[e]`` (E, I, O); rows from ``offs[-1]``
    on are zero, as in the library's loop. Computed as one matrix product with every expert's weights, ``input @
    [W_0 ... W_E-1]`` (S, E*O), from which each row takes its expert's block (``gather``): the op table sees an
    ``mm`` with the input as its only data operand (the z-rule class) and a route, so relevance is exactly the
    per-expert z-rule. It costs E times the multiply-adds of the loop and an (S, E*O) intermediate, the price of a
    graph whose shapes do not depend on how tokens were routed.
    """
    s, i = input.shape
    e, _, o = weight.shape
    rows = torch.arange(s, device=input.device, dtype=offs.dtype)
    expert = torch.searchsorted(offs, rows, right=True)  # expert of each row (E for rows past offs[-1])
    valid = expert < e
    expert = expert.clamp(max=e - 1)
    every = torch.mm(input, weight.permute(1, 0, 2).reshape(i, e * o)).reshape(s, e, o)
    out = every.gather(1, expert.reshape(s, 1, 1).expand(s, 1, o)).reshape(s, o)
    return torch.where(valid.unsqueeze(1), out, torch.zeros((), dtype=out.dtype, device=out.device))


#: ``namespace::name`` -> a traceable implementation, for library custom ops whose registered implementation
#: cannot be traced (it loops over a tensor's values)
LIBRARY_IMPLEMENTATIONS: dict[str, Callable[..., Any]] = {
    "transformers::grouped_mm_fallback": grouped_mm,
}

_warned: set[str] = set()


def _device_type(args: tuple, kwargs: dict) -> str | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device.type
    return None


def _through(qualname: str, opdef: Any, impl: Callable[..., Any] | None) -> Callable[..., Any]:
    """A decomposition that runs ``impl`` (or the op's own kernel for the inputs' device) while tracing, and
    leaves the op whole (``NotImplemented``) when that fails."""

    def decompose(*args: Any, **kwargs: Any) -> Any:
        fns = getattr(opdef, "_backend_fns", {}) if opdef is not None else {}
        fn = impl or fns.get(_device_type(args, kwargs)) or fns.get(None) or getattr(opdef, "_init_fn", None)
        if fn is None:
            return NotImplemented
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure leaves the op whole; compiling then names it
            if qualname not in _warned:
                _warned.add(qualname)
                first = (str(e).strip().splitlines() or [""])[0][:200]
                warnings.warn(
                    f"dynlrp: the custom op {qualname} is kept whole: its Python implementation could not be traced "
                    f"({type(e).__name__}: {first}). Relevance reaching it needs a rule: "
                    f"dynlrp.register_op(torch.ops.{qualname.replace('::', '.')}.default, kind).",
                    stacklevel=2,
                )
            return NotImplemented

    return decompose


def custom_op_decompositions() -> dict:
    """``{OpOverload: decomposition}`` for every custom op that can be traced through (module doc): ops defined
    with ``torch.library.custom_op`` that mutate nothing and have no op-table entry, and the ops of
    :data:`LIBRARY_IMPLEMENTATIONS` that are registered in this process."""
    from torch._library.custom_ops import OPDEFS

    from .rules.table import OP_TABLE

    table = {}
    names = set(OPDEFS) | set(LIBRARY_IMPLEMENTATIONS)
    for qualname in sorted(names):
        opdef = OPDEFS.get(qualname)
        if opdef is not None:
            op = opdef._opoverload
        else:
            ns, _, name = qualname.partition("::")
            op = getattr(getattr(getattr(torch.ops, ns, None), name, None), "default", None)
        if op is None or op in OP_TABLE or op._schema.is_mutable:
            continue
        table[op] = _through(qualname, opdef, LIBRARY_IMPLEMENTATIONS.get(qualname))
    return table


def trilinear(i1: torch.Tensor, i2: torch.Tensor, i3: torch.Tensor, expand1, expand2, expand3, sumdim,
              unroll_dim: int = 1) -> torch.Tensor:
    """``aten._trilinear`` (``nn.Bilinear``'s ``x1^T W x2``) in core ops: each operand gets its ``expand`` dims, the
    three are multiplied and ``sumdim`` is summed. The products are ``mul`` (a z-rule with the weight, then the
    product rule of the two data operands) and the sum a z-rule, where the whole op's VJP would not trace."""
    del unroll_dim  # a loop-order hint of the native kernel

    def grow(t: torch.Tensor, dims) -> torch.Tensor:
        for d in sorted(dims):
            t = t.unsqueeze(d)
        return t

    out = grow(i1, expand1) * grow(i2, expand2) * grow(i3, expand3)
    return out.sum(list(sumdim)) if len(sumdim) else out


#: ATen overload -> its decomposition into core ops (ops torch's default table leaves whole)
ATEN_DECOMPOSITIONS: dict[Any, Callable[..., Any]] = {
    torch.ops.aten._trilinear.default: trilinear,
}


def extra_decompositions() -> dict:
    """What dynlrp adds to torch's default decomposition table: :data:`ATEN_DECOMPOSITIONS` (unless the op has an
    op-table entry) and :func:`custom_op_decompositions`."""
    from .rules.table import OP_TABLE

    table = {op: fn for op, fn in ATEN_DECOMPOSITIONS.items() if op not in OP_TABLE}
    table.update(custom_op_decompositions())
    return table
