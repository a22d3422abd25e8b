"""What tracing leaves in a graph, not only what torch tags core: a sweep of single-op models.

``tests/test_core_aten_sweep.py`` classifies every ``torch.Tag.core`` overload. Models reach more than that: torch's
decomposition table leaves some ops that are not core-tagged in the graph (``nn.AdaptiveMaxPool2d`` ->
``aten.adaptive_max_pool2d``), and custom ops are never core. This sweep builds one tiny model per ``torch.nn``
module or torch function (:data:`CASES`; the output keeps the batch in dimension 0), traces it as
:func:`dynlrp_fx.compile` does, and checks every model end to end (float64, ``rules="lrp0"``, seed = the output):

* an op left in the graph that carries relevance either has an op-table entry, and then relevance passes through it
  correctly: LRP-0 equals gradient x input where the case is piecewise linear (``exact``), and otherwise the
  conservation ledger closes (``seed == inputs + absorbed`` per sample) with finite relevance;
* or ``dynlrp.compile`` raises :class:`~dynlrp_fx.DynlrpUnsupportedOpError` naming the op and the module path that
  uses it, and the op is one of :data:`UNSUPPORTED` (with the reason it has no rule);
* or tracing itself refuses the model with a ``Dynlrp*`` error (:data:`TRACE_ERRORS`: data-dependent output shapes).

Nothing may raise a raw Python or torch exception. The default run covers :data:`DEFAULT` (every non-core op the
sweep finds, a few seconds each); the rest of :data:`CASES` is marked ``slow``. :data:`NON_CORE` lists the
non-core ops found and their rules (``docs/coverage.md`` shows it); ``test_non_core_ops_are_listed`` fails when the
sweep finds a new one.

Custom ops: a ``torch.library.custom_op`` whose implementation is made of torch ops is traced through
(:mod:`dynlrp_fx.custom_ops`); an opaque one is named in the unsupported-op error; Qwen3-MoE's expert op
``transformers::grouped_mm_fallback`` is replaced by a traceable implementation.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynlrp_fx as dynlrp
from dynlrp_fx.rules.table import lookup
from dynlrp_fx.trace import trace
from tests.helpers import grad_x_input, tiny_qwen3_moe

F64 = torch.float64


@dataclass
class Case:
    """A single-op model: ``build()`` -> module (float64, eval), ``shape`` of its random input (``ids:N`` for token
    ids below N), ``exact``: piecewise linear, so LRP-0 must equal gradient x input."""

    build: Callable[[], nn.Module]
    shape: tuple
    exact: bool = False
    ids: int = 0


class Fn(nn.Module):
    """A module calling ``fn(x)`` (torch functions as single-op models)."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Head(nn.Module):
    """``body`` then a linear read-out of the flattened result (keeps the batch in dim 0, mixes every output)."""

    def __init__(self, body: nn.Module, width: int, classes: int = 3):
        super().__init__()
        self.body = body
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        y = self.body(x)
        y = y[0] if isinstance(y, tuple) else y
        return self.head(y.reshape(y.shape[0], -1))


def fn(f: Callable, shape: tuple, exact: bool = False) -> Case:
    return Case(lambda: Fn(f), shape, exact)


def mod(build: Callable[[], nn.Module], shape: tuple, exact: bool = False) -> Case:
    return Case(build, shape, exact)


def head(build: Callable[[], nn.Module], shape: tuple, exact: bool = False) -> Case:
    """``build()`` followed by a linear read-out (its width from one run on the example input)."""

    def make():
        body = build().double().eval()
        with torch.no_grad():
            y = body(torch.randn(*shape, dtype=F64))
        y = y[0] if isinstance(y, tuple) else y
        return Head(body, y[0].numel())

    return Case(make, shape, exact)


_FRACTIONAL_2D = torch.full((1, 2, 2), 0.5, dtype=F64)  # fixed samples: a deterministic fractional pooling
_FRACTIONAL_3D = torch.full((1, 2, 3), 0.5, dtype=F64)

#: name -> single-op model (each output keeps the batch in dimension 0)
CASES: dict[str, Case] = {
    # pooling
    "AdaptiveMaxPool1d": head(lambda: nn.AdaptiveMaxPool1d(3), (2, 2, 9), exact=True),
    "AdaptiveMaxPool2d": head(lambda: nn.AdaptiveMaxPool2d((3, 2)), (2, 2, 7, 5), exact=True),
    "AdaptiveMaxPool3d": head(lambda: nn.AdaptiveMaxPool3d(2), (2, 2, 5, 4, 5), exact=True),
    "FractionalMaxPool2d": head(
        lambda: nn.FractionalMaxPool2d(2, output_size=3, _random_samples=_FRACTIONAL_2D.expand(2, 2, 2)),
        (2, 2, 7, 7), exact=True),
    "FractionalMaxPool3d": head(
        lambda: nn.FractionalMaxPool3d(2, output_size=2, _random_samples=_FRACTIONAL_3D.expand(2, 2, 3)),
        (2, 2, 5, 5, 5), exact=True),
    "MaxPool1d": head(lambda: nn.MaxPool1d(2), (2, 2, 8), exact=True),
    "MaxPool2d": head(lambda: nn.MaxPool2d(2, ceil_mode=True), (2, 2, 5, 5), exact=True),
    "MaxPool3d": head(lambda: nn.MaxPool3d(2), (2, 1, 4, 4, 4), exact=True),
    "AvgPool1d": head(lambda: nn.AvgPool1d(3, 2), (2, 2, 8), exact=True),
    "AvgPool2d": head(lambda: nn.AvgPool2d(2, count_include_pad=False, padding=1), (2, 2, 5, 5), exact=True),
    "AvgPool3d": head(lambda: nn.AvgPool3d(2), (2, 1, 4, 4, 4), exact=True),
    "AdaptiveAvgPool1d": head(lambda: nn.AdaptiveAvgPool1d(3), (2, 2, 7), exact=True),
    "AdaptiveAvgPool2d": head(lambda: nn.AdaptiveAvgPool2d((3, 2)), (2, 2, 7, 5), exact=True),
    "AdaptiveAvgPool3d": head(lambda: nn.AdaptiveAvgPool3d(2), (2, 1, 5, 4, 5), exact=True),
    "LPPool1d": head(lambda: nn.LPPool1d(2, 2), (2, 2, 8)),
    "LPPool2d": head(lambda: nn.LPPool2d(2, 2), (2, 2, 4, 4)),
    "LPPool3d": head(lambda: nn.LPPool3d(2, 2), (2, 1, 4, 4, 4)),
    # convolutions and linear maps
    "Conv1d": head(lambda: nn.Conv1d(2, 3, 3, padding="same", padding_mode="circular"), (2, 2, 6), exact=True),
    "Conv2d": head(lambda: nn.Conv2d(2, 3, 3, stride=2, groups=1, dilation=2), (2, 2, 7, 7), exact=True),
    "Conv3d": head(lambda: nn.Conv3d(2, 2, 2, padding_mode="reflect", padding=1), (2, 2, 3, 3, 3), exact=True),
    "ConvTranspose1d": head(lambda: nn.ConvTranspose1d(2, 3, 3, stride=2), (2, 2, 5), exact=True),
    "ConvTranspose2d": head(lambda: nn.ConvTranspose2d(2, 2, 3, stride=2, output_padding=1), (2, 2, 3, 3), exact=True),
    "ConvTranspose3d": head(lambda: nn.ConvTranspose3d(2, 1, 2), (2, 2, 3, 3, 3), exact=True),
    "Linear": mod(lambda: nn.Linear(4, 3), (2, 4), exact=True),
    "Bilinear": mod(lambda: _Bilinear(), (2, 4)),
    "Embedding": Case(lambda: Head(nn.Embedding(7, 3), 3 * 4), (2, 4), ids=7),
    "Fold": head(lambda: nn.Fold((4, 4), 2), (2, 8, 9), exact=True),
    "Unfold": head(lambda: nn.Unfold(2, stride=1), (2, 2, 3, 3), exact=True),
    # normalisation
    "BatchNorm1d": head(lambda: nn.BatchNorm1d(3), (2, 3, 4)),
    "BatchNorm2d": head(lambda: nn.BatchNorm2d(2), (2, 2, 3, 3)),
    "InstanceNorm1d": head(lambda: nn.InstanceNorm1d(3, affine=True), (2, 3, 5)),
    "InstanceNorm2d": head(lambda: nn.InstanceNorm2d(2), (2, 2, 3, 3)),
    "LayerNorm": head(lambda: nn.LayerNorm(4), (2, 3, 4)),
    "GroupNorm": head(lambda: nn.GroupNorm(2, 4), (2, 4, 3)),
    "RMSNorm": head(lambda: nn.RMSNorm(4), (2, 3, 4)),
    "LocalResponseNorm": head(lambda: nn.LocalResponseNorm(2), (2, 4, 3, 3)),
    "normalize": head(lambda: Fn(lambda x: F.normalize(x, dim=1)), (2, 5)),
    # activations
    **{
        n: head(lambda n=n, kw=kw: getattr(nn, n)(**kw), (2, 6), exact=n in _PL)
        for n, kw in {
            "ReLU": {}, "ReLU6": {}, "LeakyReLU": {}, "PReLU": {}, "RReLU": {}, "ELU": {}, "SELU": {}, "CELU": {},
            "GELU": {"approximate": "tanh"}, "SiLU": {}, "Mish": {}, "Sigmoid": {}, "Tanh": {}, "Hardtanh": {},
            "Hardswish": {}, "Hardsigmoid": {}, "Hardshrink": {}, "Softshrink": {}, "Tanhshrink": {},
            "Softplus": {}, "Softsign": {}, "LogSigmoid": {}, "Threshold": {"threshold": 0.1, "value": 0.0},
            "GLU": {}, "Softmax": {"dim": 1}, "LogSoftmax": {"dim": 1}, "Softmin": {"dim": 1},
        }.items()
        for _PL in [{"ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "Threshold", "Hardshrink"}]
    },
    "Softmax2d": head(lambda: nn.Softmax2d(), (2, 3, 2, 2)),
    "Dropout": head(lambda: nn.Sequential(nn.Dropout(), nn.Dropout1d(), nn.AlphaDropout()), (2, 3, 4), exact=True),
    # shape and layout
    "Upsample_nearest": head(lambda: nn.Upsample(scale_factor=2), (2, 1, 3, 3), exact=True),
    "Upsample_bilinear": head(lambda: nn.Upsample(scale_factor=2, mode="bilinear"), (2, 1, 3, 3), exact=True),
    "Upsample_bicubic": head(lambda: nn.Upsample(size=5, mode="bicubic", align_corners=True), (2, 1, 3, 3),
                             exact=True),
    "Upsample_trilinear": head(lambda: nn.Upsample(scale_factor=2, mode="trilinear"), (2, 1, 2, 2, 2), exact=True),
    "interpolate_antialias": head(
        lambda: Fn(lambda x: F.interpolate(x, size=(2, 2), mode="bilinear", antialias=True)), (2, 1, 5, 5),
        exact=True),
    "PixelShuffle": head(lambda: nn.PixelShuffle(2), (2, 4, 2, 2), exact=True),
    "PixelUnshuffle": head(lambda: nn.PixelUnshuffle(2), (2, 1, 4, 4), exact=True),
    "ChannelShuffle": head(lambda: nn.ChannelShuffle(2), (2, 4, 2, 2), exact=True),
    "CircularPad2d": head(lambda: nn.CircularPad2d(1), (2, 1, 3, 3), exact=True),
    "ReflectionPad1d": head(lambda: nn.ReflectionPad1d(2), (2, 1, 4), exact=True),
    "ReplicationPad1d": head(lambda: nn.ReplicationPad1d(2), (2, 1, 4), exact=True),
    "ZeroPad2d": head(lambda: nn.ZeroPad2d(1), (2, 1, 3, 3), exact=True),
    "crop_pad": head(lambda: Fn(lambda x: F.pad(x, (-1, 2, 1, -1))), (2, 1, 4, 4), exact=True),
    "roll_flip_rot90": head(lambda: Fn(lambda x: torch.rot90(torch.roll(x.flip(1), 1, 2), 1, (1, 2))), (2, 3, 3),
                            exact=True),
    "tril_triu": head(lambda: Fn(lambda x: torch.tril(x) + torch.triu(x, 1)), (2, 3, 3), exact=True),
    "repeat_interleave": head(lambda: Fn(lambda x: x.repeat_interleave(2, dim=1)), (2, 3), exact=True),
    "take_along_dim": head(lambda: Fn(lambda x: torch.take_along_dim(x, x.argsort(1), 1)), (2, 4), exact=True),
    "diff": head(lambda: Fn(lambda x: torch.diff(x, dim=1)), (2, 5), exact=True),
    # reductions and scans
    "cumsum": head(lambda: Fn(lambda x: x.cumsum(1)), (2, 5), exact=True),
    "cumprod": head(lambda: Fn(lambda x: x.cumprod(1)), (2, 5)),
    "cummax_cummin": head(lambda: Fn(lambda x: x.cummax(1).values + x.cummin(1).values), (2, 5), exact=True),
    "logcumsumexp": head(lambda: Fn(lambda x: x.logcumsumexp(1)), (2, 5)),
    "logsumexp": head(lambda: Fn(lambda x: x.logsumexp(1, keepdim=True)), (2, 5)),
    "max_min_dim": head(lambda: Fn(lambda x: x.max(1).values - x.min(1).values), (2, 5), exact=True),
    "median": head(lambda: Fn(lambda x: x.median(1).values + x.nanmedian(1).values), (2, 5), exact=True),
    "mode": head(lambda: Fn(lambda x: x.mode(1).values), (2, 5), exact=True),
    "kthvalue": head(lambda: Fn(lambda x: x.kthvalue(2, 1).values), (2, 5), exact=True),
    "sort_topk": head(lambda: Fn(lambda x: x.sort(1).values[:, :2] + x.topk(2, 1).values), (2, 5), exact=True),
    "prod": head(lambda: Fn(lambda x: x.prod(1, keepdim=True)), (2, 3)),
    "std_var": head(lambda: Fn(lambda x: x.std(1, keepdim=True) + x.var(1, keepdim=True)), (2, 5)),
    "vector_norm": head(lambda: Fn(lambda x: torch.linalg.vector_norm(x, dim=1, keepdim=True)), (2, 5)),
    "amax_amin": head(lambda: Fn(lambda x: x.amax(1) + x.amin(1)), (2, 3, 4), exact=True),
    # elementwise
    "clamp": head(lambda: Fn(lambda x: x.clamp(-0.5, 0.5)), (2, 5)),
    "abs_sign": head(lambda: Fn(lambda x: x.abs() * 2 - x), (2, 5), exact=True),
    "maximum": head(lambda: Fn(lambda x: torch.maximum(x, x.flip(1))), (2, 5), exact=True),
    "where": head(lambda: Fn(lambda x: torch.where(x > 0, x, 0.1 * x)), (2, 5), exact=True),
    "masked_fill": head(lambda: Fn(lambda x: x.masked_fill(x < -0.5, 0.0)), (2, 5), exact=True),
    "nan_to_num": head(lambda: Fn(lambda x: torch.nan_to_num(x)), (2, 5), exact=True),
    "lerp": head(lambda: Fn(lambda x: torch.lerp(x, x.flip(1), 0.3)), (2, 5), exact=True),
    "addcmul": head(lambda: Fn(lambda x: torch.addcmul(x, x, x.flip(1), value=0.5)), (2, 5)),
    "hypot": head(lambda: Fn(lambda x: torch.hypot(x, x.flip(1))), (2, 5)),
    "logaddexp": head(lambda: Fn(lambda x: torch.logaddexp(x, x.flip(1))), (2, 5)),
    "sinc": head(lambda: Fn(lambda x: torch.sinc(x)), (2, 5)),
    "erfinv": head(lambda: Fn(lambda x: torch.erfinv(x.tanh() * 0.9)), (2, 5)),
    "lgamma_digamma": head(lambda: Fn(lambda x: torch.lgamma(x.exp()) + torch.digamma(x.exp())), (2, 5)),
    "xlogy": head(lambda: Fn(lambda x: torch.xlogy(x, x.exp())), (2, 5)),
    "copysign": head(lambda: Fn(lambda x: torch.copysign(x, x.flip(1))), (2, 5)),
    "polygamma": head(lambda: Fn(lambda x: torch.polygamma(1, x.exp())), (2, 5)),
    "frac_fmod": head(lambda: Fn(lambda x: torch.frac(x) + torch.fmod(x, 0.7)), (2, 5)),
    # products
    "matmul_batched": head(lambda: Fn(lambda x: x @ x.transpose(1, 2)), (2, 3, 4)),
    "einsum": head(lambda: Fn(lambda x: torch.einsum("bij,bkj->bik", x, x.flip(1))), (2, 3, 4)),
    "outer": head(lambda: Fn(lambda x: x[:, :, None] * x[:, None, :]), (2, 3)),
    "cross": head(lambda: Fn(lambda x: torch.linalg.cross(x, x.flip(1))), (2, 3)),
    "baddbmm": head(lambda: Fn(lambda x: torch.baddbmm(x, x, x.transpose(1, 2))), (2, 3, 3)),
    "cosine_similarity": head(lambda: Fn(lambda x: F.cosine_similarity(x, x.flip(1))[:, None]), (2, 5)),
    "pairwise_distance": head(lambda: Fn(lambda x: F.pairwise_distance(x, x.flip(1))), (2, 5)),
    "cdist": head(lambda: Fn(lambda x: torch.cdist(x, x.flip(1))), (2, 3, 4)),
    # attention and recurrent layers
    "MultiheadAttention": head(lambda: _MHA(), (2, 3, 4)),
    "TransformerEncoderLayer": head(
        lambda: nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True), (2, 3, 4)),
    "LSTM": head(lambda: nn.LSTM(4, 3, batch_first=True), (2, 3, 4)),
    "GRU": head(lambda: nn.GRU(4, 3, batch_first=True), (2, 3, 4)),
    "RNN": head(lambda: nn.RNN(4, 3, batch_first=True, nonlinearity="relu"), (2, 3, 4), exact=True),
    "grid_sample": head(lambda: Fn(lambda x: F.grid_sample(x, _GRID.expand(x.shape[0], -1, -1, -1),
                                                           align_corners=False)), (2, 1, 4, 4), exact=True),
    # linear algebra and spectra
    "linalg_inv": head(lambda: Fn(lambda x: torch.linalg.inv(x + 3 * torch.eye(3, dtype=x.dtype))), (2, 3, 3)),
    "linalg_det": head(lambda: Fn(lambda x: torch.linalg.det(x)[:, None]), (2, 3, 3)),
    "linalg_solve": head(lambda: Fn(lambda x: torch.linalg.solve(x + 3 * torch.eye(3, dtype=x.dtype), x)),
                         (2, 3, 3)),
    "fft_rfft_abs": head(lambda: Fn(lambda x: torch.fft.rfft(x).abs()), (2, 8)),
}

_GRID = torch.linspace(-0.9, 0.9, 18, dtype=F64).reshape(1, 3, 3, 2)


class _Bilinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Bilinear(4, 4, 3)

    def forward(self, x):
        return self.b(x, x.flip(1))


class _MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


#: ops without a rule that the sweep finds, and why each has none (compiling names them)
UNSUPPORTED: dict[str, str] = {
    "aten.hypot.default": "sqrt(a^2 + b^2) of two data operands: no conservative LRP split",
    "aten.cumprod.default": "running products: no conservative LRP split (as aten.prod, which is declared none)",
    "aten.logcumsumexp.default": "running log-sum-exp: no LRP rule (a soft maximum over a growing window)",
    "aten._linalg_det.default": "determinant: a polynomial of every entry, no LRP rule",
}

#: cases that tracing refuses with a ``Dynlrp*`` error (the message names the construct)
TRACE_ERRORS: dict[str, str] = {
    "linalg_inv": "torch.export wraps the linalg error check in the higher-order op with_effects",
    "linalg_solve": "torch.export wraps the linalg error check in the higher-order op with_effects",
}

#: ops outside Core ATen that tracing leaves in the sweep's graphs -> the rule class they get (None: no rule)
NON_CORE: dict[str, str | None] = {
    "aten.adaptive_max_pool2d.default": "route",  # nn.AdaptiveMaxPool1d/2d
    "aten.adaptive_max_pool3d.default": "route",
    "aten.fractional_max_pool2d.default": "route",
    "aten.fractional_max_pool3d.default": "route",
    "aten.cummax.default": "route",
    "aten.cummin.default": "route",
    "aten.median.dim": "route",
    "aten.nanmedian.dim": "route",
    "aten.kthvalue.default": "route",
    "aten.mode.default": "route",
    "aten.rrelu_with_noise_functional.default": "identity",  # nn.RReLU
    "aten.erfinv.default": "identity",
    "aten.lgamma.default": "identity",
    "aten.digamma.default": "identity",
    "aten.polygamma.default": "identity",
    "aten.copysign.Tensor": "identity",
    "aten._upsample_bilinear2d_aa.default": "linear",  # F.interpolate(antialias=True)
    "aten.scaled_dot_product_attention.default": "sdpa",  # kept whole by dynlrp's tracing table
    "aten.hypot.default": None,
    "aten.cumprod.default": None,
    "aten.logcumsumexp.default": None,
    "aten._linalg_det.default": None,
}

#: cases with a known defect outside the op table (strict xfail: they fail the run once fixed, so the entry goes)
KNOWN_GAPS: dict[str, str] = {}

#: the default run: every case with a non-core op or a rule added for the sweep (about 2 s each)
DEFAULT = {
    "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d", "FractionalMaxPool2d", "cummax_cummin", "median",
    "RReLU", "ZeroPad2d", "crop_pad", "hypot", "Bilinear",
}


def _input(case: Case, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if case.ids:
        return torch.randint(0, case.ids, case.shape, generator=g)
    return torch.randn(*case.shape, generator=g, dtype=F64)


def _model(case: Case) -> nn.Module:
    torch.manual_seed(0)
    return case.build().double().eval()


def graph_ops(model: nn.Module, x: torch.Tensor) -> set[str]:
    """Every op left in the graph by tracing as ``dynlrp.compile`` does."""
    traced = trace(model, (x,), {})
    return {str(n.target) for n in traced.graph_module.graph.nodes if n.op == "call_function"}


def sweep_case(name: str) -> dict:
    """Trace, compile and explain one case; returns what happened (``ops``, and ``error`` or the check's numbers).
    Raises on anything but a ``Dynlrp*`` error."""
    case = CASES[name]
    model, x = _model(case), _input(case)
    try:
        ops = graph_ops(model, x)
    except dynlrp.DynlrpTraceError as e:
        return {"trace_error": str(e)}
    try:
        explainer = dynlrp.compile(model, x, rules="lrp0", backend="eager")
    except dynlrp.DynlrpUnsupportedOpError as e:
        return {"ops": ops, "unsupported": e.uncovered, "message": str(e)}
    y = model(x)
    target = y.reshape(y.shape[0], -1).argmax(1)
    expl = explainer(x, target=target)
    c = expl.conservation
    res = {"ops": ops, "finite": bool(torch.isfinite(torch.cat([r.reshape(-1) for r in expl.inputs.values()])).all()),
           "ledger": float((c.seed - c.inputs - c.absorbed).abs().max() / c.seed.abs().max())}
    if case.exact:
        ref = grad_x_input(model, x, target)
        res["gxi"] = float((expl.relevance - ref).abs().max() / ref.abs().max())
    return res


def _check(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sweep_case(name)
    if "trace_error" in res:
        assert name in TRACE_ERRORS, f"{name}: tracing refused the model: {res['trace_error'][:400]}"
        return
    assert name not in TRACE_ERRORS, f"{name} traces now: remove it from TRACE_ERRORS"
    non_core = {op for op in res["ops"] if _non_core(op)}
    unlisted = non_core - set(NON_CORE)
    assert not unlisted, f"{name}: non-core ops not in NON_CORE: {sorted(unlisted)}"
    if "unsupported" in res:
        for op, paths in res["unsupported"].items():
            assert op in UNSUPPORTED, f"{name}: {op} has no rule (used by {paths})"
            assert op in res["message"] and all(p in res["message"] for p in paths[:5])
            assert "register_op" in res["message"]
        return
    assert res["finite"], f"{name}: non-finite relevance"
    assert res["ledger"] < 1e-9, f"{name}: the conservation ledger is off by {res['ledger']:.2g} of the seed"
    if "gxi" in res:
        assert res["gxi"] < 1e-9, f"{name}: LRP-0 differs from gradient x input by {res['gxi']:.2g}"


def _non_core(name: str) -> bool:
    """Whether a graph target (``aten.adaptive_max_pool2d.default``) is an ATen op without the core tag."""
    if not name.startswith("aten."):
        return False
    _, base, ov = name.split(".")
    op = getattr(getattr(torch.ops.aten, base), ov)
    return torch.Tag.core not in op.tags and not name.startswith("aten.sym_")


def _marks(name: str) -> list:
    marks = [] if name in DEFAULT else [pytest.mark.slow]
    if name in KNOWN_GAPS:
        marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[name]))
    return marks


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in CASES])
def test_single_op_model(name):
    _check(name)


_KIND_CLASS = {"route": "route", "unary": "identity", "affine": "linear", "sdpa": "sdpa"}


def test_non_core_ops_have_the_listed_rules():
    """Each op of :data:`NON_CORE` is outside Core ATen and has the listed rule (or none, and then a reason)."""
    from dynlrp_fx.coverage import non_core_ops

    listed = {r["op"]: r["kind"] for r in non_core_ops()}
    for name, cls in NON_CORE.items():
        assert _non_core(name), f"{name} is core-tagged: it belongs to tests/test_core_aten_sweep.py"
        _, base, ov = name.split(".")
        spec = lookup(getattr(getattr(torch.ops.aten, base), ov))
        if cls is None:
            assert spec is None and name in UNSUPPORTED, f"{name}: has a rule now, or no reason in UNSUPPORTED"
        else:
            assert spec is not None and _KIND_CLASS[spec.kind] == cls, f"{name}: {spec} does not give {cls}"
            assert listed.get(name) == spec.kind, f"{name}: missing from coverage.non_core_ops (docs/coverage.md)"


# -- custom ops ------------------------------------------------------------------------------------------------------
def _dense_relu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.relu(x @ w.t() + b)


#: a custom op made of torch ops (a linear map and a ReLU), with no autograd formula
dense_relu = torch.library.custom_op("dynlrp_sweep::dense_relu", _dense_relu, mutates_args=())


@dense_relu.register_fake
def _(x, w, b):
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.custom_op("dynlrp_sweep::numpy_tanh", mutates_args=())
def numpy_tanh(x: torch.Tensor) -> torch.Tensor:
    """An opaque custom op: its implementation leaves torch (NumPy)."""
    return torch.from_numpy(np.tanh(x.detach().cpu().numpy())).to(x.device)


@numpy_tanh.register_fake
def _(x):
    return torch.empty_like(x)


class CustomDense(nn.Module):
    """Linear -> the custom op ``dense_relu`` (in ``block``) -> Linear."""

    def __init__(self, opaque: bool = False):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.block = nn.Linear(6, 5)
        self.out = nn.Linear(5, 3)
        self.opaque = opaque
        self.dense = torch.ops.dynlrp_sweep.dense_relu  # the reference swaps in the plain function

    def forward(self, x):
        h = self.inp(x)
        if self.opaque:
            h = self.block(torch.ops.dynlrp_sweep.numpy_tanh(h))
        else:
            h = self.dense(torch.relu(h), self.block.weight, self.block.bias)
        return self.out(h)


def test_custom_op_with_a_python_implementation_is_traced_through():
    """The custom op is replaced by its implementation's ATen ops, so LRP-0 equals gradient x input through it."""
    torch.manual_seed(0)
    model = CustomDense().double().eval()
    x = torch.randn(5, 4, dtype=F64)
    ops = graph_ops(model, x)
    assert not any("dynlrp_sweep" in op for op in ops), ops
    expl = dynlrp.compile(model, x, rules="lrp0", backend="eager")(x, target=1)
    reference = copy.deepcopy(model)  # the op has no autograd formula: differentiate its implementation
    reference.dense = _dense_relu
    ref = grad_x_input(reference, x, 1)
    assert ref.abs().max() > 0
    torch.testing.assert_close(expl.relevance, ref, rtol=1e-9, atol=1e-12)


def test_custom_op_rule_wins_over_tracing_through():
    """An op the user registered keeps its rule: it stays whole in the graph."""
    from dynlrp_fx.rules.table import OP_TABLE

    op = torch.ops.dynlrp_sweep.dense_relu.default
    try:
        dynlrp.register_op(op, "affine", slots=(0,))
        model = CustomDense().double().eval()
        assert "dynlrp_sweep.dense_relu.default" in graph_ops(model, torch.randn(2, 4, dtype=F64))
    finally:
        OP_TABLE.pop(op, None)


def test_opaque_custom_op_is_named_in_the_unsupported_op_error():
    model = CustomDense(opaque=True).double().eval()
    x = torch.randn(2, 4, dtype=F64)
    with pytest.warns(UserWarning, match="dynlrp_sweep::numpy_tanh is kept whole"):
        with pytest.raises(dynlrp.DynlrpUnsupportedOpError) as info:
            dynlrp.compile(model, x, backend="eager")
    msg = str(info.value)
    assert "dynlrp_sweep.numpy_tanh.default" in msg and "register_op" in msg
    assert info.value.uncovered == {"dynlrp_sweep.numpy_tanh.default": ["<root>"]}


def test_grouped_mm_equals_the_library_loop():
    """The traceable ``transformers::grouped_mm_fallback`` equals the library's loop, empty experts and rows past
    the last offset included."""
    from dynlrp_fx.decompositions import grouped_mm

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 3, generator=g, dtype=F64), torch.randn(4, 3, 5, generator=g, dtype=F64)
    offs = torch.tensor([2, 2, 5, 6])
    want = torch.zeros(7, 5, dtype=F64)
    start = 0
    for e, end in enumerate(offs.tolist()):
        want[start:end] = x[start:end] @ w[e]
        start = end
    torch.testing.assert_close(grouped_mm(x, w, offs), want, rtol=1e-12, atol=1e-12)


@pytest.mark.slow  # ~20 s: in CI's slow step (test-slow-ci)
def test_qwen3_moe_gradient_preset_equals_autograd():
    """Qwen3-MoE from its default config (sizes shrunk): the experts' custom op is traced through, and the
    ``gradient`` preset equals autograd's gradient x input with respect to the input embeddings."""
    from tests.helpers import GRADIENT_TOL, gradient_oracle_errors

    model = tiny_qwen3_moe()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    explainer = dynlrp.compile(model, (), example_kwargs={"input_ids": ids}, rules="gradient", backend="eager")
    assert not any("grouped_mm" in r["op"] for r in explainer.rule_table())
    errs = gradient_oracle_errors(explainer(input_ids=ids), model, (), {"input_ids": ids})
    assert errs["input_ids"] <= GRADIENT_TOL, errs
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the model was modified"


def test_an_op_with_side_effects_is_named_with_a_way_out():
    """torch.linalg.inv checks its input with an effectful op (export wraps it in with_effects): the error names
    that op and the side-effect-free variant, which then compiles and equals autograd's gradient x input."""

    class Inverse(nn.Module):
        def __init__(self, checked: bool):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.checked = checked

        def forward(self, x):
            a = self.lin.weight + 4 * torch.eye(4)
            inv = torch.linalg.inv(a) if self.checked else torch.linalg.inv_ex(a)[0]
            return x @ inv

    with pytest.raises(dynlrp.DynlrpTraceError, match=r"_linalg_check_errors.*side effects.*inv_ex"):
        dynlrp.compile(Inverse(True).eval(), torch.randn(3, 4))
    model = Inverse(False).eval()
    x = torch.randn(3, 4)
    expl = dynlrp.compile(model, x, rules="gradient")(x, target=1)
    torch.testing.assert_close(expl.relevance, grad_x_input(model, x, 1), rtol=1e-5, atol=1e-6)


def test_uninitialised_memory_never_reaches_the_ledger():
    """A circular pad fills an ``empty()`` tensor region by region; the intermediate values hold whatever memory the
    allocator handed out where nothing is written yet. Their relevance there is ``0`` (nothing arrives), not
    ``garbage * 0``: with the allocator's free memory filled with NaN the ledger still closes, call after call (it
    was NaN in about half the calls before such values were masked)."""
    case = CASES["CircularPad2d"]
    model, x = _model(case), _input(case)
    explainer = dynlrp.compile(model, x, rules="lrp0", backend="eager")
    for _ in range(8):
        junk = [torch.full((n,), float("nan"), dtype=torch.float64) for n in (8, 16, 25, 32, 50, 64, 128, 1000) * 20]
        del junk
        c = explainer(x, target=0).conservation
        assert bool(torch.isfinite(c.absorbed).all()), c.absorbed
        assert float((c.seed - c.inputs - c.absorbed).abs().max() / c.seed.abs().max()) < 1e-9
