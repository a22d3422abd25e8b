"""LRP rules: the op table (:mod:`.table`), the rule mechanism (:mod:`.base`), the basic rules (:mod:`.core`), the
rule library of Zennit / AttnLRP / DynamicLRP (:mod:`.lrp`), rule assignment (:mod:`.composite`) and
:func:`describe_op` (:mod:`.describe`: what the table and the presets say about one op, ``dynlrp info --op``)."""

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
    NormEpsilon,
    Numerator,
    Route,
    Uniform,
)
from .describe import OpDescription, describe_op
from .lrp import (
    AbsProportional,
    AlphaBeta,
    CPBilinear,
    Flat,
    Gamma,
    GradientTimesInput,
    Pass,
    WSquare,
    ZBox,
    ZPlus,
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
    "NormEpsilon",
    "NormalizerIdentity",
    "Numerator",
    "Route",
    "Uniform",
    "AbsProportional",
    "AlphaBeta",
    "CPBilinear",
    "Flat",
    "Gamma",
    "GradientTimesInput",
    "Pass",
    "WSquare",
    "ZBox",
    "ZPlus",
    "OP_TABLE",
    "OpSpec",
    "classify",
    "lookup",
    "register_op",
    "describe_op",
    "OpDescription",
]
