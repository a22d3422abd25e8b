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

from torch import nn

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
CANONIZERS = ("fold_batchnorm", "merge_batchnorm")


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
    canonizers: graph canonicalisation the explainer runs around assigning rules: ``"fold_batchnorm"``
        folds eval-mode batch norm into the preceding convolution/linear op (Zennit's ``MergeBatchNorm``: the
        weights are scaled in the graph at every call, as weight-modifying rules need); ``"merge_batchnorm"`` gives
        the same relevance for epsilon rules without touching weights: where the producer and the batch norm both
        have the plain :class:`~dynlrp_fx.rules.Epsilon` rule, the producer gets LRP-0 and the batch norm the
        producer's rule (one stabiliser at the merged output; see
        :func:`dynlrp_fx.passes.fold_batchnorm.merge_batchnorm_rules`).
    name: shown in ``rule_table()`` and saved with exported programs.
    check_matches: when compiling, a ``by_path`` glob that matches no module of the model raises
        :class:`~dynlrp_fx.DynlrpInputError` (a typo would make its rule disappear), and ``by_path`` / ``by_op`` /
        ``by_module_type`` entries that no node uses warn. The presets, written for any model, turn it off.

    Raises ``ValueError`` (at construction) for an unknown rule class, an op name that is no ATen op, a module type
    that is not an ``nn.Module`` subclass, or a value that is not a :class:`~dynlrp_fx.rules.Rule`.
    """

    class_rules: dict[str, Rule] = field(default_factory=default_class_rules)
    by_op: dict = field(default_factory=dict)
    by_module_type: dict = field(default_factory=dict)
    by_path: dict = field(default_factory=dict)
    first_layer: Rule | None = None
    name: str = "custom"
    first_layer_types: tuple | None = None
    canonizers: tuple = ()
    check_matches: bool = True

    def __post_init__(self):
        from .table import RULE_CLASSES

        bad = [k for k in self.class_rules if k not in RULE_CLASSES]
        if bad:
            raise ValueError(f"Composite: unknown rule classes {bad}; rule classes are {list(RULE_CLASSES)}")
        merged = default_class_rules()
        merged.update(self.class_rules)
        self.class_rules = merged
        self.canonizers = tuple(self.canonizers)
        unknown = [c for c in self.canonizers if c not in CANONIZERS]
        if unknown:
            raise ValueError(f"Composite: unknown canonizers {unknown}; available: {list(CANONIZERS)}")
        for op in self.by_op:
            if isinstance(op, str) and not _names_an_overload(op):
                raise ValueError(
                    f"Composite: by_op key {op!r} is no ATen op overload of this torch (write e.g. "
                    "'aten.convolution.default' or torch.ops.aten.convolution.default)"
                )
        for t in self.by_module_type:
            if not (isinstance(t, type) and issubclass(t, nn.Module)) and not (
                isinstance(t, tuple) and all(isinstance(x, type) and issubclass(x, nn.Module) for x in t)
            ):
                raise ValueError(f"Composite: by_module_type key {t!r} is not an nn.Module subclass")
        for where, table in (("class_rules", self.class_rules), ("by_op", self.by_op),
                             ("by_module_type", self.by_module_type), ("by_path", self.by_path)):
            for key, rule in table.items():
                if not isinstance(rule, Rule):
                    raise ValueError(f"Composite: {where}[{key!r}] is {rule!r}, not a dynlrp_fx.rules.Rule")
        if self.first_layer is not None and not isinstance(self.first_layer, Rule):
            raise ValueError(f"Composite: first_layer is {self.first_layer!r}, not a dynlrp_fx.rules.Rule")

    def rule_for(self, info: NodeInfo, used: set | None = None) -> Rule:
        """The rule for a node, by precedence path glob > first layer > module type > op > class default.

        ``used`` collects ``(table, key)`` of the entries that chose a rule (see :meth:`unused`)."""

        def fits(rule: Rule) -> bool:
            return info.rule_class in rule.classes

        def chosen(table: str, key: Any, rule: Rule) -> Rule:
            if used is not None:
                used.add((table, key))
            return rule

        for pattern, rule in self.by_path.items():
            if info.module_path and fnmatch.fnmatchcase(info.module_path, pattern) and fits(rule):
                return chosen("by_path", pattern, rule)
        if info.first_layer and self.first_layer is not None and fits(self.first_layer):
            if self.first_layer_types is None or _inside(info, tuple(self.first_layer_types)):
                return self.first_layer
        for mtype, rule in self.by_module_type.items():
            if _inside(info, mtype) and fits(rule):
                return chosen("by_module_type", mtype, rule)
        for op, rule in self.by_op.items():
            if (op is info.op or str(op) == str(info.op)) and fits(rule):
                return chosen("by_op", op, rule)
        return self.class_rules[info.rule_class]

    def unused(self, used: set) -> list[tuple[str, Any]]:
        """The ``by_path`` / ``by_module_type`` / ``by_op`` entries not in ``used`` (collected by :meth:`rule_for`)."""
        return [
            (table, key)
            for table in ("by_path", "by_module_type", "by_op")
            for key in getattr(self, table)
            if (table, key) not in used
        ]


def _names_an_overload(name: str) -> bool:
    """Whether ``name`` is the name of one op overload (``"aten.convolution.default"``, optionally with
    ``torch.ops.``), the form :meth:`Composite.rule_for` compares ``by_op`` keys with."""
    from .describe import resolve_op  # describe reads the presets, which build composites

    try:
        _, ops = resolve_op(name)
    except ValueError:
        return False
    return len(ops) == 1 and str(ops[0]) == name.removeprefix("torch.ops.")
