"""Named rule presets (composites), selectable by name: ``dynlrp.compile(model, x, rules="epsilon_gamma_box")``.

Every preset keeps the attention-aware defaults for what Zennit has no rule for (AttnLRP: softmax deep-Taylor rule,
uniform-epsilon for ``q k^T`` and ``p v``, uniform for gates, normaliser identity for RMSNorm, and for LayerNorm /
GroupNorm only the division by the standard deviation as identity, the mean subtraction and the affine part by epsilon:
:class:`~dynlrp_fx.rules.NormEpsilon`, as AttnLRP's implementation LXT and Ali et al. 2022; the native op and a
decomposed ``xc * rsqrt(mean(xc * xc) + eps)`` with ``xc = x - mean(x)`` give the same relevance).

``epsilon``: LRP-epsilon (eps=1e-6, Zennit's default) on linear ops, identity through activations; an eval-mode
batch norm right after a convolution or ``nn.Linear`` counts as one linear map with it, as if folded (Zennit's
``SequentialMergeBatchNorm``): one stabiliser at the batch norm's output, LRP-0 at the producer, weights untouched
(the ``merge_batchnorm`` canonizer; the same relevance as folding, without a per-call weight product).
``lrp0``: the same with eps = 0 (equals gradient x input on piecewise-linear networks).

Zennit's composites, same names and defaults (``zennit.composites``): convolutions get the named rule, ``nn.Linear``
gets ``Epsilon(epsilon)``, activations and (un-merged) batch norm ``Pass``, sums and average pooling ``Norm``
(= epsilon with the stabiliser), max-pooling the gradient (winner takes all); batch norm after a convolution or
linear layer is folded into it (Zennit's ``SequentialMergeBatchNorm`` canonizer):

* ``epsilon_gamma_box(low, high)``: first convolution z^B box, other convolutions ``Gamma(0.25)``.
* ``epsilon_plus``: convolutions ``ZPlus``. ``epsilon_plus_flat``: plus ``Flat`` on the first linear/conv layer.
* ``epsilon_alpha2_beta1``: convolutions ``AlphaBeta(2, 1)``; ``epsilon_alpha2_beta1_flat``: plus first ``Flat``.

Attention: ``attnlrp`` (Achtibat et al. 2024), ``cp_lrp`` (Ali et al. 2022: no relevance through query and key),
``dynamiclrp`` (Lee & Arias 2025, the paper's ViT configuration), and ``gradient`` (gradient x input, a baseline).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .rules.composite import Composite, default_class_rules
from .rules.core import AttnLRPAttention, Epsilon, NoRelevance
from .rules.lrp import AbsProportional, AlphaBeta, CPBilinear, Flat, Gamma, GradientTimesInput, Pass, ZBox, ZPlus

__all__ = [
    "epsilon",
    "lrp0",
    "epsilon_gamma_box",
    "epsilon_plus",
    "epsilon_plus_flat",
    "epsilon_alpha2_beta1",
    "epsilon_alpha2_beta1_flat",
    "attnlrp",
    "cp_lrp",
    "dynamiclrp",
    "gradient",
    "resolve",
    "PRESETS",
    "CONV_TYPES",
    "LINEAR_TYPES",
    "BATCHNORM_TYPES",
    "IMAGENET_LOW",
    "IMAGENET_HIGH",
]

#: Zennit's ``Convolution`` (standard and transposed)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: Zennit's ``Linear`` (convolutions and ``nn.Linear``)
LINEAR_TYPES = CONV_TYPES + (nn.Linear,)
#: Zennit's ``BatchNorm``
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
#: per-channel bounds of ImageNet-normalised pixels in [0, 1] (the default of ``rules="epsilon_gamma_box"``)
IMAGENET_LOW = tuple((0.0 - m) / s for m, s in zip(_IMAGENET_MEAN, _IMAGENET_STD))
IMAGENET_HIGH = tuple((1.0 - m) / s for m, s in zip(_IMAGENET_MEAN, _IMAGENET_STD))


def epsilon(eps: float = 1e-6) -> Composite:
    """LRP-epsilon everywhere linear (AttnLRP for attention), a batch norm merged with the convolution or linear op
    before it (one stabiliser at the merged output, as Zennit's canonizers do); see module doc."""
    return Composite(default_class_rules(eps), name=f"epsilon(eps={eps:g})" if eps != 1e-6 else "epsilon",
                     canonizers=("merge_batchnorm",))


def lrp0() -> Composite:
    """LRP-0: epsilon with eps = 0 (safe division)."""
    return Composite(default_class_rules(0.0), name="lrp0")


def _zennit(
    name: str,
    conv_rule: Any,
    *,
    epsilon: float,
    stabilizer: float,
    first: Any = None,
    first_types: tuple | None = None,
    canonize: bool = True,
) -> Composite:
    """A Zennit layer-map composite: ``layer_map_base(stabilizer)`` + conv rule + ``nn.Linear -> Epsilon``."""
    class_rules = default_class_rules(epsilon)
    class_rules["linear"] = Epsilon(stabilizer)  # Zennit's Norm for sum / average pooling
    by_type: dict = {t: Pass() for t in BATCHNORM_TYPES}
    by_type.update({t: conv_rule for t in CONV_TYPES})
    by_type[nn.Linear] = Epsilon(epsilon)
    return Composite(
        class_rules,
        by_module_type=by_type,
        first_layer=first,
        first_layer_types=first_types,
        canonizers=("fold_batchnorm",) if canonize else (),
        name=name,
        check_matches=False,  # written for any model: layer types a model lacks are fine
    )


def epsilon_gamma_box(
    low: Any = IMAGENET_LOW,
    high: Any = IMAGENET_HIGH,
    epsilon: float = 1e-6,
    gamma: float = 0.25,
    stabilizer: float = 1e-6,
    canonize: bool = True,
) -> Composite:
    """Zennit's ``EpsilonGammaBox``: z^B(low, high) for the first convolution, ``Gamma(gamma)`` for the other
    convolutions, ``Epsilon(epsilon)`` for ``nn.Linear``.

    ``low``/``high``: scalars, per-channel sequences/tensors or tensors broadcastable to the input. The defaults
    (used by ``rules="epsilon_gamma_box"``) are the bounds of ImageNet-normalised pixels, per channel, which fit
    3-channel inputs only: pass your own bounds for other data. ``canonize``: fold batch norms (see module doc).
    """
    import torch

    low = torch.as_tensor(low, dtype=torch.float64)
    high = torch.as_tensor(high, dtype=torch.float64)
    return _zennit(
        "epsilon_gamma_box",
        Gamma(gamma, stabilizer),
        epsilon=epsilon,
        stabilizer=stabilizer,
        first=ZBox(low, high, stabilizer),
        first_types=CONV_TYPES,
        canonize=canonize,
    )


def epsilon_plus(epsilon: float = 1e-6, stabilizer: float = 1e-6, canonize: bool = True) -> Composite:
    """Zennit's ``EpsilonPlus``: ``ZPlus`` for convolutions, ``Epsilon`` for ``nn.Linear``."""
    return _zennit("epsilon_plus", ZPlus(stabilizer), epsilon=epsilon, stabilizer=stabilizer, canonize=canonize)


def epsilon_plus_flat(epsilon: float = 1e-6, stabilizer: float = 1e-6, canonize: bool = True) -> Composite:
    """Zennit's ``EpsilonPlusFlat``: ``Flat`` for the first linear/conv layer, then ``ZPlus`` / ``Epsilon``."""
    return _zennit(
        "epsilon_plus_flat",
        ZPlus(stabilizer),
        epsilon=epsilon,
        stabilizer=stabilizer,
        first=Flat(stabilizer),
        first_types=LINEAR_TYPES,
        canonize=canonize,
    )


def epsilon_alpha2_beta1(epsilon: float = 1e-6, stabilizer: float = 1e-6, canonize: bool = True) -> Composite:
    """Zennit's ``EpsilonAlpha2Beta1``: ``AlphaBeta(2, 1)`` for convolutions, ``Epsilon`` for ``nn.Linear``."""
    return _zennit(
        "epsilon_alpha2_beta1",
        AlphaBeta(2.0, 1.0, stabilizer),
        epsilon=epsilon,
        stabilizer=stabilizer,
        canonize=canonize,
    )


def epsilon_alpha2_beta1_flat(epsilon: float = 1e-6, stabilizer: float = 1e-6, canonize: bool = True) -> Composite:
    """Zennit's ``EpsilonAlpha2Beta1Flat``: ``Flat`` for the first linear/conv layer, then ``AlphaBeta(2, 1)``."""
    return _zennit(
        "epsilon_alpha2_beta1_flat",
        AlphaBeta(2.0, 1.0, stabilizer),
        epsilon=epsilon,
        stabilizer=stabilizer,
        first=Flat(stabilizer),
        first_types=LINEAR_TYPES,
        canonize=canonize,
    )


def attnlrp(eps: float = 0.0) -> Composite:
    """AttnLRP (Achtibat et al. 2024): LRP-0 for linear ops, the deep-Taylor softmax rule, uniform for the bilinear
    ``q k^T`` and ``p v`` (SDPA included) and for gates (SiLU/GLU products), identity for activations and for the
    RMSNorm scaling, and for LayerNorm (and GroupNorm) the standard deviation as a constant: ``y = w (x - mean(x)) /
    std + b`` with ``std`` fixed is an affine map of ``x`` (:class:`~dynlrp_fx.rules.NormEpsilon`; Ali et al. 2022,
    as in LXT). This is LXT's efficient AttnLRP (gradient x input of the patched model, no stabiliser), and in
    gradient form it costs a gradient. ``eps > 0`` gives the epsilon variant (the rules of :func:`epsilon`: linear
    ops, bilinear products, the softmax and LayerNorm stabilised by ``eps``)."""
    c = epsilon(eps)
    c.name = "attnlrp" if eps == 0 else f"attnlrp(eps={eps:g})"
    return c


def cp_lrp(eps: float = 0.0) -> Composite:
    """CP-LRP (Ali et al. 2022): as :func:`attnlrp`, but attention weights are constants: relevance reaches only
    the values (SDPA: ``AttnLRPAttention(cp=True)``; decomposed attention: :class:`~dynlrp_fx.rules.CPBilinear`,
    nothing flows through the softmax, the query or the key). LRP-0 by default, as LXT; ``eps > 0`` stabilises."""
    rules = default_class_rules(eps)
    rules["sdpa"] = AttnLRPAttention(eps, cp=True)
    rules["bilinear"] = CPBilinear(eps)
    return Composite(rules, name="cp_lrp" if eps == 0 else f"cp_lrp(eps={eps:g})")


def dynamiclrp(
    gamma_conv: float = 130.0, gamma_linear: float = 0.001, attention: str = "cp", eps: float = 1e-6
) -> Composite:
    """DynamicLRP (Lee & Arias 2025), the configuration of the paper's ViT experiment.

    The paper (section "Results") "tuned [DynamicLRP] to behave similarly to specifications defined in AttnLRP,
    using gamma-LRP for Convolutional and Linear layers (gamma_conv = 130, gamma_linear = 0.001), while routing
    relevance only through the final matrix multiplication of Attention modules and skipping the softmax": so
    ``Gamma(gamma_conv)`` for every ``convolution`` op, ``Gamma(gamma_linear)`` for every matmul with a weight
    operand (``addmm``/``mm``/``bmm``: assigned by op, as DynamicLRP does, so the functional q/k/v and output
    projections of ``nn.MultiheadAttention`` are included; products of two data tensors keep their rule), and
    attention as CP-LRP (``attention="cp"``; ``"attnlrp"`` selects the AttnLRP rules
    for SDPA, softmax and bilinear matmuls instead). Additions and sums use the paper's absolute-value proportional
    split (:class:`~dynlrp_fx.rules.AbsProportional`); everything else is as in :func:`attnlrp`.
    """
    if attention not in ("cp", "attnlrp"):
        raise ValueError(f"dynamiclrp: attention must be 'cp' or 'attnlrp', got {attention!r}")
    rules = default_class_rules(eps)
    rules["linear"] = AbsProportional(eps)
    if attention == "cp":
        rules["sdpa"] = AttnLRPAttention(eps, cp=True)
        rules["bilinear"] = CPBilinear(eps)
    import torch

    aten = torch.ops.aten
    lin = Gamma(gamma_linear, eps)
    by_op: dict = {aten.convolution.default: Gamma(gamma_conv, eps)}
    by_op.update({op: lin for op in (aten.addmm.default, aten.mm.default, aten.bmm.default, aten.baddbmm.default)})
    return Composite(rules, by_op=by_op, name="dynamiclrp", check_matches=False)  # ops a model may not use


def gradient() -> Composite:
    """Gradient x input (a baseline, not LRP): every op propagates ``R_k = x_k * J_k^T (R / z)``, which keeps
    ``R = value * gradient`` at every node (see :class:`~dynlrp_fx.rules.GradientTimesInput`), so with
    ``target=`` the input relevance is ``x * d y_target / d x``. An explicit ``seed=`` is read as relevance too
    (``seed = y * g`` gives ``x * J^T g``)."""
    g = GradientTimesInput()
    rules = {c: g for c in g.classes}
    rules["none"] = NoRelevance()
    return Composite(rules, name="gradient")


PRESETS: dict[str, Callable[[], Composite]] = {
    "epsilon": epsilon,
    "lrp0": lrp0,
    "epsilon_gamma_box": epsilon_gamma_box,
    "epsilon_plus": epsilon_plus,
    "epsilon_plus_flat": epsilon_plus_flat,
    "epsilon_alpha2_beta1": epsilon_alpha2_beta1,
    "epsilon_alpha2_beta1_flat": epsilon_alpha2_beta1_flat,
    "attnlrp": attnlrp,
    "cp_lrp": cp_lrp,
    "dynamiclrp": dynamiclrp,
    "gradient": gradient,
}


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
