"""The op table: every ATen op that can carry relevance -> its *kind* (how relevance may flow through it).

Like JAX's ``primitive_transposes`` dict, this is data: one line per op, filled by small helpers. The kind of an
op plus the data-ness of its operands at a graph node gives the node's *rule class* (:func:`classify`), and a
composite maps rule classes to concrete rules.

Kinds
-----
route        values move/copy/select/sum without scaling: ``R_k = J_k^T R``
affine       (sum of) linear maps of the data operands plus constants: z-rule class ``linear``
multilinear  products of operands (``factors``): one data factor -> ``linear``; several -> ``product``
             (elementwise) or ``bilinear`` (matmul/conv)
unary        elementwise nonlinearity of one data operand: ``identity``
div          ``a / b``: ``linear`` for a constant divisor, else ``normalizer`` (detected) or ``div``
softmax      ``softmax``; layernorm: ``layernorm``; embedding: ``embedding``; sdpa: ``sdpa``
none         declared to carry no relevance (statistics, masks, integer/bool or shape values, RNG)

``register_op`` adds an op (e.g. a custom ``torch.library`` op) to the table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["OpSpec", "OP_TABLE", "register_op", "lookup", "classify", "RULE_CLASSES", "KINDS"]

aten = torch.ops.aten

KINDS = ("route", "affine", "multilinear", "unary", "div", "softmax", "layernorm", "embedding", "sdpa", "none")
RULE_CLASSES = (
    "route",
    "linear",
    "bilinear",
    "product",
    "identity",
    "softmax",
    "layernorm",
    "normalizer",
    "div",
    "embedding",
    "sdpa",
    "none",
)


@dataclass(frozen=True)
class OpSpec:
    """How relevance can flow through an op.

    kind: one of :data:`KINDS`.
    factors: argument positions that are multiplicative factors (multilinear ops).
    slots: argument positions that may receive relevance (``None``: every tensor operand).
    elementwise: for multilinear ops, whether the product is elementwise (-> ``product`` class).
    """

    kind: str
    factors: tuple = ()
    slots: tuple | None = None
    elementwise: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown op kind {self.kind!r}; expected one of {KINDS}")


OP_TABLE: dict[Any, OpSpec] = {}


def _overloads(packet_or_op) -> list:
    if isinstance(packet_or_op, torch._ops.OpOverloadPacket):
        return [getattr(packet_or_op, o) for o in packet_or_op.overloads()]
    return [packet_or_op]


def register_op(op, kind: str, *, factors: Iterable[int] = (), slots: Iterable[int] | None = None,
                elementwise: bool = False, overwrite: bool = True) -> None:
    """Declare how relevance flows through ``op`` (an ``OpOverload``, or a packet: all its overloads).

    Example: ``dynlrp.register_op(torch.ops.mylib.scale.default, "affine")`` makes a custom op that is linear in
    its data operands use the z-rule class (epsilon, gamma, ...).
    """
    spec = OpSpec(kind, tuple(factors), tuple(slots) if slots is not None else None, elementwise)
    for o in _overloads(op):
        if overwrite or o not in OP_TABLE:
            OP_TABLE[o] = spec


def _reg(kind: str, names: str, **kw) -> None:
    for name in names.split():
        base, _, ov = name.partition(".")
        packet = getattr(aten, base, None)
        if packet is None:
            continue
        if ov:
            op = getattr(packet, ov, None)
            if op is not None:
                register_op(op, kind, **kw)
        else:
            register_op(packet, kind, **kw)


# --- route: relevance moves with the values -------------------------------------------------------------------
_reg("route", """_to_copy alias as_strided cat clone constant_pad_nd copy diagonal expand expand_copy flip gather
    index.Tensor index_put index_select masked_scatter max_pool2d_with_indices max_pool3d_with_indices
    max_pool1d_with_indices permute reflection_pad1d reflection_pad2d reflection_pad3d replication_pad1d
    replication_pad2d replication_pad3d repeat select select_scatter slice slice_scatter split_with_sizes
    split squeeze unsqueeze view reshape _unsafe_view t transpose unfold roll _unsafe_index unbind
    upsample_nearest1d upsample_nearest2d upsample_nearest3d amax amin max.dim min.dim maximum minimum sort
    topk scatter.src scatter.value lift_fresh_copy detach contiguous tril triu pixel_shuffle pixel_unshuffle
    channel_shuffle narrow movedim chunk stack flatten unflatten squeeze_copy unsqueeze_copy view_copy
    permute_copy slice_copy select_copy transpose_copy t_copy alias_copy diagonal_copy index_copy
    masked_fill max.default min.default""")
_reg("route", "where.self", slots=(1, 2))
# --- affine: z-rule class 'linear' ------------------------------------------------------------------------------
_reg("affine", """add sub rsub neg mean sum cumsum avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d
    adaptive_avg_pool2d _adaptive_avg_pool2d _adaptive_avg_pool3d adaptive_avg_pool3d
    _native_batch_norm_legit_no_training upsample_bilinear2d upsample_linear1d upsample_bicubic2d
    upsample_trilinear3d _upsample_bilinear2d_aa scatter_add index_add col2im im2col mul.Scalar div.Scalar
    div.Scalar_mode trace""")
_reg("affine", "grid_sampler_2d", slots=(0,))
# --- multilinear -------------------------------------------------------------------------------------------------
_reg("multilinear", "mul.Tensor", factors=(0, 1), elementwise=True)
_reg("multilinear", "mm bmm", factors=(0, 1))
_reg("multilinear", "addmm baddbmm", factors=(1, 2))
_reg("multilinear", "convolution _convolution", factors=(0, 1))
# --- elementwise nonlinearities: identity ---------------------------------------------------------------------
_reg("unary", """relu relu6 gelu silu sigmoid tanh elu selu celu leaky_relu hardtanh hardswish hardsigmoid mish
    softplus exp exp2 expm1 log log1p log2 log10 sqrt rsqrt reciprocal erf erfc abs sin cos tan asin acos atan
    sinh cosh asinh acosh atanh pow.Tensor_Scalar square sign floor ceil round trunc frac logit erfinv
    clamp_min clamp_max _log_softmax log_sigmoid""")
_reg("unary", "clamp.default clamp.Tensor", slots=(0,))
_reg("unary", "pow.Scalar", slots=(1,))
_reg("unary", "native_dropout", slots=(0,))
# --- special kinds ------------------------------------------------------------------------------------------
_reg("div", "div.Tensor div.Tensor_mode")
_reg("softmax", "_softmax _safe_softmax softmax.int", slots=(0,))
_reg("layernorm", "native_layer_norm native_group_norm _native_batch_norm_legit", slots=(0,))
_reg("embedding", "embedding", slots=(1,))
_reg("sdpa", "scaled_dot_product_attention", slots=(0, 1, 2))
# --- declared to carry no relevance ------------------------------------------------------------------------
_reg("none", """eq ne lt le gt ge argmax argmin any all isinf isnan isfinite logical_and logical_or logical_not
    logical_xor bitwise_and bitwise_or bitwise_xor bitwise_not nonzero sym_size sym_numel sym_stride
    sym_storage_offset sym_is_contiguous _local_scalar_dense full full_like empty_like zeros_like ones_like
    rand_like randn_like rand randn randperm randint scalar_tensor arange empty empty_strided fmod remainder
    var std var_mean std_mean fill resize_ _assert_tensor_metadata _assert_scalar sym_constrain_range
    sym_constrain_range_for_size convolution_backward native_layer_norm_backward native_group_norm_backward
    embedding_dense_backward max_pool2d_with_indices_backward avg_pool2d_backward _adaptive_avg_pool2d_backward
    bucketize searchsorted""")
# --- the rest of Core ATen (tests/test_core_aten_sweep.py classifies every core-tagged overload) -----------------
# elementwise functions of two tensors: identity to the first operand (atan2's y, pow's base), like clamp.Tensor
_reg("unary", "atan2 pow.Tensor_Tensor", slots=(0,))
# scatter_reduce: linear in self and src for sum/mean (the z-rule is also exact for amax/amin winners)
_reg("affine", "scatter_reduce.two", slots=(0, 3))
# embedding bags: linear in the weight and the per-sample weights (token ids get no relevance through a bag)
_reg("affine", "_embedding_bag", slots=(0, 6))
# declared: no LRP rule; relevance arriving here is absorbed and shows in the conservation ledger
#   prod: product reductions (no conservative split); cdist/pdist: distances; fft: complex-valued spectra
_reg("none", "prod _cdist_forward _pdist_forward _fft_r2c _fft_c2r")


def lookup(op) -> OpSpec | None:
    """The :class:`OpSpec` of an op overload, or ``None`` when the op has no entry."""
    return OP_TABLE.get(op)


def classify(spec: OpSpec, data_slots: list, meta: dict | None = None) -> str:
    """Rule class of a node from its op spec and which operand slots carry data."""
    meta = meta or {}
    k = spec.kind
    if k == "route":
        return "route"
    if k == "affine":
        return "linear"
    if k == "multilinear":
        if meta.get("normalizer_slot") is not None:
            return "normalizer"
        n = sum(1 for s in data_slots if s[0] in spec.factors)
        if n <= 1:
            return "linear"
        return "product" if spec.elementwise else "bilinear"
    if k == "unary":
        return "identity"
    if k == "div":
        if meta.get("normalizer_slot") is not None:
            return "normalizer"
        return "div" if any(s[0] == 1 for s in data_slots) else "linear"
    return k
