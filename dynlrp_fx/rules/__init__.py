"""LRP rules: the op table (:mod:`.table`), the rule mechanism (:mod:`.base`), the rules (:mod:`.core`) and
rule assignment (:mod:`.composite`)."""

from .base import Rule, RuleContext, safe_divide, stabilize
from .composite import Composite, NodeInfo, default_class_rules
from .core import (
    LRP0,
    AttnLRPAttention,
    AttnLRPSoftmax,
    EmbeddingRows,
    Epsilon,
    Identity,
    NoRelevance,
    NormAffine,
    NormalizerIdentity,
    Numerator,
    Route,
    Uniform,
)
from .table import OP_TABLE, OpSpec, classify, lookup, register_op

__all__ = [
    "Rule",
    "RuleContext",
    "safe_divide",
    "stabilize",
    "Composite",
    "NodeInfo",
    "default_class_rules",
    "LRP0",
    "AttnLRPAttention",
    "AttnLRPSoftmax",
    "EmbeddingRows",
    "Epsilon",
    "Identity",
    "NoRelevance",
    "NormAffine",
    "NormalizerIdentity",
    "Numerator",
    "Route",
    "Uniform",
    "OP_TABLE",
    "OpSpec",
    "classify",
    "lookup",
    "register_op",
]
