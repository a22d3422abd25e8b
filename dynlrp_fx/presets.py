"""Named rule presets (composites), selectable by name: ``dynlrp.compile(model, x, rules="epsilon")``.

``epsilon``: LRP-epsilon (eps=1e-6, Zennit's default) on linear ops, identity through activations, AttnLRP on
attention (softmax deep-Taylor rule, uniform-epsilon for q k^T and p v, uniform for gates), normaliser identity
for LayerNorm/RMSNorm. ``lrp0``: the same with eps = 0 (equals gradient x input on piecewise-linear networks).
"""

from __future__ import annotations

from typing import Any, Callable

from .rules.composite import Composite, default_class_rules

__all__ = ["epsilon", "lrp0", "resolve", "PRESETS"]


def epsilon(eps: float = 1e-6) -> Composite:
    """LRP-epsilon everywhere linear (AttnLRP for attention); see module doc."""
    return Composite(default_class_rules(eps), name=f"epsilon(eps={eps:g})" if eps != 1e-6 else "epsilon")


def lrp0() -> Composite:
    """LRP-0: epsilon with eps = 0 (safe division)."""
    return Composite(default_class_rules(0.0), name="lrp0")


PRESETS: dict[str, Callable[[], Composite]] = {"epsilon": epsilon, "lrp0": lrp0}


def resolve(rules: Any) -> Composite:
    """Turn ``rules=`` (``None``, a preset name, a :class:`Composite`, or ``{rule class: Rule}``) into a Composite."""
    if rules is None:
        return epsilon()
    if isinstance(rules, Composite):
        return rules
    if isinstance(rules, str):
        try:
            return PRESETS[rules]()
        except KeyError:
            raise ValueError(f"unknown rules preset {rules!r}; presets: {sorted(PRESETS)}") from None
    if isinstance(rules, dict):
        return Composite(dict(rules))
    raise TypeError(f"rules= must be a preset name, a dynlrp.Composite or a dict, not {type(rules).__name__}")
