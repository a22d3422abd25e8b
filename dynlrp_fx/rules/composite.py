"""Rule assignment: a :class:`Composite` maps each op node to a rule.

Layers of choices, the most specific wins: module path glob > first layer > module type > op > rule class
default; the "first layer" choice applies for the first linear/conv op that consumes an input (Zennit's composites, applied to ops).
A rule chosen by module path, type or op only applies to nodes whose rule class it fits (``Rule.classes``), so
``by_module_type={nn.Conv2d: Gamma(0.25)}`` changes the convolution and leaves the module's reshapes alone.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from .base import Rule
from .core import (
    AttnLRPAttention,
    AttnLRPSoftmax,
    EmbeddingRows,
    Epsilon,
    Identity,
    NoRelevance,
    NormalizerIdentity,
    NormEpsilon,
    Numerator,
    Route,
    Uniform,
)

__all__ = ["Composite", "NodeInfo", "default_class_rules", "CANONIZERS"]

#: canonicalisation passes a composite may request (see ``dynlrp_fx.passes``)
CANONIZERS = ("fold_batchnorm",)


@dataclass
class NodeInfo:
    """What a composite knows about a node when it picks a rule."""

    name: str
    op: Any
    rule_class: str
    module_path: str = ""
    module_types: tuple = ()  #: types of the enclosing modules, outermost first
    first_layer: bool = False


def default_class_rules(epsilon: float = 1e-6) -> dict[str, Rule]:
    """Rule per rule class for the epsilon preset (``epsilon=0``: LRP-0)."""
    return {
        "route": Route(),
        "linear": Epsilon(epsilon),
        "bilinear": Epsilon(epsilon),
        "product": Uniform(),
        "identity": Identity(),
        "softmax": AttnLRPSoftmax(),
        "layernorm": NormEpsilon(epsilon),
        "normalizer": NormalizerIdentity(),
        "div": Numerator(),
        "embedding": EmbeddingRows(),
        "sdpa": AttnLRPAttention(epsilon),
        "none": NoRelevance(),
    }


def _inside(info: NodeInfo, mtype: type | tuple) -> bool:
    """Whether the node lies inside a module of type ``mtype`` (a type or a tuple of types)."""
    return any(issubclass(t, mtype) for t in info.module_types if isinstance(t, type))


@dataclass
class Composite:
    """A complete rule assignment.

    Parameters
    ----------
    class_rules: rule per rule class (defaults: :func:`default_class_rules`).
    by_op: ``{OpOverload or op name like "aten.convolution.default": Rule}``.
    by_module_type: ``{nn.Module subclass: Rule}``: nodes inside a module of that type.
    by_path: ``{glob: Rule}`` over module paths (``"features.0"``, ``"encoder.layer.*.attention.*"``).
    first_layer: rule for the first linear/conv op(s) that consume a model input.
    first_layer_types: when given, ``first_layer`` only applies to first-layer ops inside a module of one of these
        types (Zennit's ``first_map``: e.g. only a first ``nn.Conv2d`` gets z^B in ``epsilon_gamma_box``).
    canonizers: graph canonicalisation passes the explainer runs before assigning rules: ``"fold_batchnorm"``
        folds eval-mode batch norm into the preceding convolution/linear op (Zennit's ``MergeBatchNorm``).
    name: shown in ``rule_table()`` and saved with exported programs.
    """

    class_rules: dict[str, Rule] = field(default_factory=default_class_rules)
    by_op: dict = field(default_factory=dict)
    by_module_type: dict = field(default_factory=dict)
    by_path: dict = field(default_factory=dict)
    first_layer: Rule | None = None
    name: str = "custom"
    first_layer_types: tuple | None = None
    canonizers: tuple = ()

    def __post_init__(self):
        merged = default_class_rules()
        merged.update(self.class_rules)
        self.class_rules = merged
        self.canonizers = tuple(self.canonizers)
        unknown = [c for c in self.canonizers if c not in CANONIZERS]
        if unknown:
            raise ValueError(f"Composite: unknown canonizers {unknown}; available: {list(CANONIZERS)}")

    def rule_for(self, info: NodeInfo) -> Rule:
        """The rule for a node, by precedence path glob > first layer > module type > op > class default."""

        def fits(rule: Rule) -> bool:
            return info.rule_class in rule.classes

        for pattern, rule in self.by_path.items():
            if info.module_path and fnmatch.fnmatchcase(info.module_path, pattern) and fits(rule):
                return rule
        if info.first_layer and self.first_layer is not None and fits(self.first_layer):
            if self.first_layer_types is None or _inside(info, tuple(self.first_layer_types)):
                return self.first_layer
        for mtype, rule in self.by_module_type.items():
            if _inside(info, mtype) and fits(rule):
                return rule
        for op, rule in self.by_op.items():
            if (op is info.op or str(op) == str(info.op)) and fits(rule):
                return rule
        return self.class_rules[info.rule_class]
