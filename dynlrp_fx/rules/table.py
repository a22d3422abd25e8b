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
from dataclasses import dataclass, replace
from typing import Any

import torch

__all__ = [
    "OpSpec", "OP_TABLE", "register_op", "lookup", "facts", "classify", "returns_alias", "is_cheap",
    "recompute_cost", "RULE_CLASSES", "KINDS", "FACTS", "NONNEG", "VERSION_DEPENDENT",
]

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
    """Everything the compiler knows about one op: how relevance flows through it and the facts passes read.

    Relevance
        kind: one of :data:`KINDS`, or ``None`` for an op that only carries facts (relevance reaching it is an
            unsupported op, as for an op without an entry).
        factors: argument positions that are multiplicative factors (multilinear ops).
        slots: argument positions that may receive relevance (``None``: every tensor operand).
        elementwise: for multilinear ops, whether the product is elementwise (-> ``product`` class).
        bias: argument position of an additive bias operand (``convolution``'s ``bias``, ``addmm``'s ``self``,
            ``native_layer_norm``'s ``bias``): weight-modifying rules treat it separately.
    Facts for the passes
        cheap: the ``recompute`` memory policy may rematerialise its value (besides ops torch tags ``pointwise``,
            which always may): views, casts, ``cat``, inference batch norm, LayerNorm.
        recompute_cost: ops one recomputation of it counts toward the policy's bound (views count 0).
        nonneg: ``"always"``: the output is ``>= 0`` (ReLU, sigmoid, softmax); ``"floor"``: ``>= 0`` when its lower
            bound argument is (clamp); ``"preserves"``: ``>= 0`` when every floating operand is (pooling, sums,
            products, reshapes). Read by the non-negativity analysis for the gamma / z+ / alpha-beta fast paths.
        reduction: reduces over dimensions (or returns such statistics): a normaliser's scale must pass one, and
            common-subexpression elimination merges repeats of it (small results).
        scale: may appear in the computation of a normaliser's scale from its input (statistics and elementwise
            arithmetic: RMSNorm's ``x * rsqrt(mean(x * x) + eps)``).
        activation: an elementwise function that may appear in a decomposed activation ``a * g(a)`` (SiLU, GELU).
        homogeneous: an elementwise function with ``f(c x) = c f(x)`` for ``c > 0`` (ReLU, leaky ReLU), so that
            ``f(x) / x`` is its derivative: the identity rule's gradient form is then the op's own gradient.
        reshape: its result is its operand's elements in row-major order under another shape (value numbering).
        lookup: its first operand is a table it reads only the returned entries of (``embedding``, ``gather``), so
            the result's size, not the table's, is what recomputing it reads.
        aliases: returns a view of its first operand although its schema does not say so (``_unsafe_view``).
    """

    kind: str | None
    factors: tuple = ()
    slots: tuple | None = None
    elementwise: bool = False
    bias: int | None = None
    cheap: bool = False
    recompute_cost: int = 1
    nonneg: str | None = None
    reduction: bool = False
    scale: bool = False
    activation: bool = False
    homogeneous: bool = False
    reshape: bool = False
    lookup: bool = False
    aliases: bool = False

    def __post_init__(self):
        if self.kind is not None and self.kind not in KINDS:
            raise ValueError(f"unknown op kind {self.kind!r}; expected one of {KINDS} (or None: facts only)")
        if self.nonneg not in NONNEG:
            raise ValueError(f"unknown nonneg {self.nonneg!r}; expected one of {NONNEG}")


#: values of :attr:`OpSpec.nonneg`
NONNEG = (None, "always", "floor", "preserves")
#: fields of :class:`OpSpec` that are facts for the passes (everything but the relevance fields)
FACTS = ("bias", "cheap", "recompute_cost", "nonneg", "reduction", "scale", "activation", "homogeneous", "reshape",
         "lookup", "aliases")

OP_TABLE: dict[Any, OpSpec] = {}


def _overloads(packet_or_op) -> list:
    if isinstance(packet_or_op, torch._ops.OpOverloadPacket):
        return [getattr(packet_or_op, o) for o in packet_or_op.overloads()]
    if not isinstance(packet_or_op, torch._ops.OpOverload):
        raise TypeError(
            f"register_op takes an OpOverload or OpOverloadPacket (torch.ops.ns.op.overload), not "
            f"{type(packet_or_op).__name__}: {packet_or_op!r}"
        )
    return [packet_or_op]


_UNSET: Any = object()


def register_op(op, kind: str | None = _UNSET, *, factors: Iterable[int] = _UNSET,
                slots: Iterable[int] | None = _UNSET, elementwise: bool = _UNSET, overwrite: bool = True,
                **facts: Any) -> None:
    """Declare how relevance flows through ``op`` (an ``OpOverload``, or a packet: all its overloads), and any
    facts the passes read (:class:`OpSpec`'s fact fields, e.g. ``cheap=True``, ``nonneg="preserves"``).

    Fields not given keep the op's current values (or the defaults for a new op); ``overwrite=False`` leaves ops
    that already have an entry alone. This is all a new op needs: every pass reads the table.

    Example: ``dynlrp.register_op(torch.ops.mylib.scale.default, "affine")`` makes a custom op that is linear in
    its data operands use the z-rule class (epsilon, gamma, ...).
    """
    unknown = set(facts) - set(FACTS)
    if unknown:
        raise TypeError(f"register_op: unknown fields {sorted(unknown)}; facts are {FACTS}")
    given = dict(facts)
    if kind is not _UNSET:
        given["kind"] = kind
    if factors is not _UNSET:
        given["factors"] = tuple(factors)
    if slots is not _UNSET:
        given["slots"] = tuple(slots) if slots is not None else None
    if elementwise is not _UNSET:
        given["elementwise"] = elementwise
    for o in _overloads(op):
        old = OP_TABLE.get(o)
        if old is not None and not overwrite:
            continue
        OP_TABLE[o] = replace(old, **given) if old is not None else OpSpec(**{"kind": None, **given})


#: aten op names that only some supported torch releases define (skipped where missing; any other name that does
#: not resolve is a typo and an error at import)
VERSION_DEPENDENT = frozenset({"sym_is_contiguous", "_safe_softmax", "expand_copy", "_upsample_bilinear2d_aa"})


def _resolve(name: str) -> list:
    """``"add"`` -> every overload of ``aten.add``; ``"add.Tensor"`` -> that overload; ``[]`` for a
    version-dependent name this torch lacks; ``ValueError`` for any other name that does not resolve."""
    base, _, ov = name.partition(".")
    packet = getattr(aten, base, None)
    op = packet if not ov or packet is None else getattr(packet, ov, None)
    if op is None:
        if base in VERSION_DEPENDENT:
            return []
        raise ValueError(f"op table: aten.{name} does not exist in torch {torch.__version__}")
    return [op]


def _reg(kind: str | None, names: str, **kw) -> None:
    """Register every op in the whitespace-separated ``names`` (``packet`` or ``packet.overload``)."""
    for name in names.split():
        for op in _resolve(name):
            register_op(op, kind, **kw)


def _facts(names: str, **facts) -> None:
    """Add facts to the ops in ``names`` (their kinds stay; ops without an entry get a facts-only entry)."""
    for name in names.split():
        for op in _resolve(name):
            register_op(op, **facts)


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
# --- ops outside Core ATen that torch's decomposition table leaves in the graph (tests/test_op_sweep.py) ----------
# max pooling variants: the output is the input at the returned indices, so relevance goes to the winners (route)
_reg("route", """adaptive_max_pool2d adaptive_max_pool3d fractional_max_pool2d fractional_max_pool3d""", slots=(0,))
# selections with indices: each value is one input element (running maximum, median, k-th value, mode)
_reg("route", "cummax cummin median.dim nanmedian.dim kthvalue mode", slots=(0,))
# RReLU in eval mode is a leaky ReLU (slope (lower + upper) / 2); elementwise functions of one data operand
_reg("unary", "rrelu_with_noise_functional rrelu_with_noise", slots=(0,))
_reg("unary", "lgamma digamma i0 special_i0e special_i1 special_i1e special_ndtr special_ndtri special_log_ndtr")
_reg("unary", "copysign.Tensor", slots=(0,))
_reg("unary", "polygamma", slots=(1,))


# --- facts for the passes ------------------------------------------------------------------------------------
_reg("multilinear", "convolution _convolution", factors=(0, 1), bias=2)
_reg("multilinear", "addmm baddbmm", factors=(1, 2), bias=0)
_facts("native_layer_norm", bias=3)
# an added number is a bias too (the gradient-form ledger records its share): add/sub/rsub's second operand
_facts("add.Tensor add.Scalar sub.Tensor sub.Scalar rsub.Tensor rsub.Scalar", bias=1)
_facts("native_group_norm", bias=2)
# cheap to recompute besides pointwise ops: views and copies; lookups (``embedding``, ``gather``: they read as
# many table entries as they return, so an embedding is redone from the ids instead of held through the sweep);
# inference batch norm is a per-channel affine map recomputed from the convolution output the relevance half
# holds anyway; a LayerNorm output is recomputed from its input (held for the LayerNorm rule), and counts 4 (it
# reads its input twice and reduces it), so chains along post-LN residual streams stop every few layers
_facts("""view.default reshape.default _unsafe_view.default permute.default expand.default squeeze.dim squeeze.dims
    unsqueeze.default t.default transpose.int slice.Tensor select.int alias.default _to_copy.default cat.default
    _native_batch_norm_legit_no_training.default""", cheap=True)
_facts("embedding.default gather.default", cheap=True, lookup=True)
_facts("native_layer_norm.default", cheap=True, recompute_cost=4)
_facts("relu sigmoid _softmax softmax exp abs sqrt hardsigmoid", nonneg="always")
_facts("clamp clamp_min hardtanh", nonneg="floor")
_facts("""view reshape _unsafe_view permute transpose t expand slice select squeeze unsqueeze clone _to_copy alias
    contiguous cat flatten index gather max_pool2d max_pool2d_with_indices max_pool3d_with_indices
    adaptive_max_pool2d adaptive_max_pool3d fractional_max_pool2d fractional_max_pool3d avg_pool1d
    avg_pool2d avg_pool3d adaptive_avg_pool2d _adaptive_avg_pool2d mean sum amax add mul upsample_nearest2d
    pixel_shuffle repeat stack dropout native_dropout""", nonneg="preserves")
_facts("sum mean amax amin aminmax argmax argmin var std var_mean norm linalg_vector_norm native_layer_norm",
       reduction=True)
_facts("""mean sum var std var_mean amax norm linalg_vector_norm native_layer_norm add sub mul div rsqrt sqrt pow
    reciprocal clamp clamp_min clamp_max _to_copy reshape view expand unsqueeze squeeze alias clone abs neg square
    maximum""", scale=True)
_facts("""add sub mul div pow neg _to_copy clone alias tanh erf erfc sigmoid exp expm1 log log1p sqrt rsqrt
    reciprocal abs square clamp clamp_min clamp_max relu gelu silu softplus hardtanh hardsigmoid hardswish sign
    where""", activation=True)
_facts("relu leaky_relu", homogeneous=True)
_facts("view.default _unsafe_view.default reshape.default alias.default", reshape=True)
_facts("_unsafe_view.default", aliases=True)


def lookup(op) -> OpSpec | None:
    """The :class:`OpSpec` of an op overload when it has a relevance kind, else ``None`` (no rule)."""
    spec = OP_TABLE.get(op)
    return spec if spec is not None and spec.kind is not None else None


_NO_FACTS = OpSpec(None)


def facts(op) -> OpSpec:
    """The :class:`OpSpec` of ``op`` for its facts (an all-default spec for an op without an entry)."""
    return OP_TABLE.get(op, _NO_FACTS) if isinstance(op, torch._ops.OpOverload) else _NO_FACTS


def returns_alias(op: torch._ops.OpOverload) -> bool:
    """Whether ``op``'s result aliases an operand (a view or an in-place op), schema annotation or not."""
    return facts(op).aliases or any(r.alias_info is not None for r in op._schema.returns)


def is_cheap(op: Any) -> bool:
    """Whether the ``recompute`` policy may rematerialise ``op``: a deterministic, functional op that torch tags
    ``pointwise`` or the table marks :attr:`~OpSpec.cheap`."""
    if not isinstance(op, torch._ops.OpOverload):
        return False
    if torch.Tag.nondeterministic_seeded in op.tags or op._schema.is_mutable:
        return False
    return torch.Tag.pointwise in op.tags or facts(op).cheap


def recompute_cost(op: Any) -> int:
    """Ops one recomputation of ``op`` counts toward the policy's bound: 0 for views, else its table cost."""
    if not isinstance(op, torch._ops.OpOverload) or returns_alias(op):
        return 0
    return facts(op).recompute_cost


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
