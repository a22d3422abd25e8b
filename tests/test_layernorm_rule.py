"""The LayerNorm / GroupNorm rule of AttnLRP (Ali et al. 2022; Achtibat et al. 2024; LXT): only the division by the
standard deviation is identity (``rstd`` a constant), the mean subtraction and the affine part get epsilon.

Oracles: gradient x input of the same network with the standard deviation detached (LXT's efficient LayerNorm),
the decomposed LayerNorm (its normaliser detection), and conservation of the rule itself without a bias."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynlrp_fx as dynlrp
from dynlrp_fx import presets
from dynlrp_fx.rules import Composite, NormAffine, NormEpsilon, RuleContext

aten = torch.ops.aten
D = torch.float64
TINY = 1e-12


def _randomize(norm: nn.Module, gen: torch.Generator) -> nn.Module:
    with torch.no_grad():
        if getattr(norm, "weight", None) is not None:
            norm.weight.copy_(torch.randn(norm.weight.shape, generator=gen, dtype=norm.weight.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=gen, dtype=norm.bias.dtype))
    return norm


def detached_layernorm(x, norm: nn.LayerNorm):
    """``w * (x - mean(x)) / std(x).detach() + b`` (LXT's ``layer_norm_forward``)."""
    dims = tuple(range(x.ndim - len(norm.normalized_shape), x.ndim))
    mu = x.mean(dims, keepdim=True)
    std = (x.var(dims, unbiased=False, keepdim=True) + norm.eps).sqrt()
    y = (x - mu) / std.detach()
    if norm.weight is not None:
        y = y * norm.weight
    if norm.bias is not None:
        y = y + norm.bias
    return y


def detached_groupnorm(x, norm: nn.GroupNorm):
    xg = x.reshape(x.shape[0], norm.num_groups, -1)
    mu = xg.mean(-1, keepdim=True)
    std = (xg.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
    y = ((xg - mu) / std.detach()).reshape(x.shape)
    shape = (-1,) + (1,) * (x.ndim - 2)
    if norm.weight is not None:
        y = y * norm.weight.reshape(shape)
    if norm.bias is not None:
        y = y + norm.bias.reshape(shape)
    return y


class Net(nn.Module):
    """Linear -> norm -> ReLU -> Linear -> norm -> ReLU -> Linear: piecewise linear apart from the norms."""

    def __init__(self, make_norm, features: int, hidden: int, shape: tuple):
        super().__init__()
        self.shape = shape
        self.fc1 = nn.Linear(features, hidden)
        self.n1 = make_norm()
        self.fc2 = nn.Linear(hidden, hidden)
        self.n2 = make_norm()
        self.out = nn.Linear(hidden, 3)

    def forward(self, x, norm=None):
        norm = norm or (lambda t, m: m(t))
        B = x.shape[0]
        h = torch.relu(norm(self.fc1(x).reshape(B, *self.shape), self.n1)).reshape(B, -1)
        h = torch.relu(norm(self.fc2(h).reshape(B, *self.shape), self.n2)).reshape(B, -1)
        return self.out(h)


CASES = {
    "layernorm": (lambda: nn.LayerNorm(8), (8,), detached_layernorm),
    "layernorm_no_bias": (lambda: nn.LayerNorm(8, bias=False), (8,), detached_layernorm),
    "layernorm_no_affine": (lambda: nn.LayerNorm(8, elementwise_affine=False), (8,), detached_layernorm),
    "layernorm_2d": (lambda: nn.LayerNorm((2, 4)), (2, 4), detached_layernorm),
    "layernorm_tokens": (lambda: nn.LayerNorm(4), (2, 4), detached_layernorm),  # normalises each row of (2, 4)
    "groupnorm": (lambda: nn.GroupNorm(2, 4), (4, 2), detached_groupnorm),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_attnlrp_norm_equals_gradient_x_input_with_detached_std(case):
    """On a network that is piecewise linear apart from its norms, AttnLRP with epsilon -> 0 is gradient x input of
    the same network with the norms' standard deviation detached (the mean subtraction is differentiated)."""
    make_norm, shape, ref_norm = CASES[case]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    m = Net(make_norm, 6, 8, shape).double().eval()
    _randomize(m.n1, gen), _randomize(m.n2, gen)
    x = torch.randn(5, 6, generator=gen, dtype=D)
    target = torch.tensor([0, 1, 2, 1, 0])
    ex = dynlrp.compile(m, x, rules=presets.attnlrp(TINY), backend="eager")
    rows = [r for r in ex.rule_table() if r["rule_class"] == "layernorm"]
    assert len(rows) == 2 and all("NormEpsilon" in r["rule"] for r in rows)
    e = ex(x, target=target)

    xr = x.clone().requires_grad_()
    y = m(xr, norm=ref_norm)
    (g,) = torch.autograd.grad(y.gather(1, target[:, None]).sum(), xr)
    ref = (g * x).detach()
    assert ref.abs().max() > 1e-3
    assert torch.allclose(e.relevance, ref, atol=1e-9, rtol=0), (e.relevance - ref).abs().max()
    # the old rule (whole normalisation as identity) is a different explanation
    old = dynlrp.compile(m, x, rules=Composite({"layernorm": NormAffine(TINY)}), backend="eager")(x, target=target)
    assert (old.relevance - ref).abs().max() > 1e-3


class DecomposedLN(nn.Module):
    """A hand-written LayerNorm over the last dim (same parameters as ``ln``)."""

    def __init__(self, ln: nn.LayerNorm, form: str):
        super().__init__()
        self.ln, self.form = ln, form

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        xc = x - mu
        if self.form == "rsqrt":  # x - mean computed once, scaled by rsqrt of its mean square
            h = xc * torch.rsqrt((xc * xc).mean(-1, keepdim=True) + self.ln.eps)
        elif self.form == "div":
            h = xc / torch.sqrt(xc.pow(2).mean(-1, keepdim=True) + self.ln.eps)
        elif self.form == "convnext":  # x - mean written twice (ConvNeXt's LayerNorm): one value by value numbering
            h = (x - mu) / torch.sqrt((x - mu).pow(2).mean(-1, keepdim=True) + self.ln.eps)
        else:  # "var": scaled by the variance of x itself (torch.var), which is that of x - mean(x)
            h = (x - mu) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + self.ln.eps)
        return h * self.ln.weight + self.ln.bias


class Block(nn.Module):
    def __init__(self, norm: nn.Module | None = None, ln: nn.LayerNorm | None = None):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.norm = norm if norm is not None else ln
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def _native_and_decomposed(form):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    native = Block(ln=_randomize(nn.LayerNorm(8), gen)).double().eval()
    decomposed = Block(norm=DecomposedLN(native.norm, form)).double().eval()
    decomposed.fc1, decomposed.fc2 = native.fc1, native.fc2
    x = torch.randn(4, 6, generator=gen, dtype=D)
    assert torch.allclose(native(x), decomposed(x), atol=1e-12)
    return native, decomposed, x


def _check_native_equals_decomposed(form):
    native, decomposed, x = _native_and_decomposed(form)
    rules = presets.attnlrp(TINY)
    ex_d = dynlrp.compile(decomposed, x, rules=rules, backend="eager")
    e_n = dynlrp.compile(native, x, rules=rules, backend="eager")(x, target=1)
    e_d = ex_d(x, target=1)
    assert torch.allclose(e_n.relevance, e_d.relevance, atol=1e-9, rtol=0), (e_n.relevance - e_d.relevance).abs().max()
    # the decomposed normaliser: identity to x - mean (nothing into the variance path)
    norm_rows = [r for r in ex_d.rule_table() if r["module"] == "norm" and r["rule_class"] == "normalizer"]
    assert any("NormalizerIdentity" in r["rule"] for r in norm_rows)


@pytest.mark.parametrize("form", ["rsqrt", "div", "convnext", "var"])
def test_native_layernorm_equals_decomposed(form):
    """``native_layer_norm`` (NormEpsilon) and the same LayerNorm written out (normaliser identity to
    ``x - mean(x)``, epsilon through the ``sub`` and the ``mean``) give the same relevance."""
    _check_native_equals_decomposed(form)


def _ctx(op, args, r):
    out = op(*args)
    return RuleContext(op, args, {}, out, (r, None, None), [(0,)])


@pytest.mark.parametrize("kind", ["layer", "group"])
def test_norm_epsilon_conserves_without_bias(kind):
    """Without a bias, sum R_x = sum (x - mean) * s = sum R for any output relevance R (exactly with epsilon = 0,
    i.e. up to the stabiliser)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 6, generator=gen, dtype=D) * 3 + 1
    r = torch.randn(3, 4, 6, generator=gen, dtype=D)
    if kind == "layer":
        w = torch.randn(6, generator=gen, dtype=D)
        op, args = aten.native_layer_norm.default, (x, [6], w, None, 1e-5)
        groups = x.reshape(3, 4, 1, 6)
    else:
        w = torch.randn(4, generator=gen, dtype=D)
        op, args = aten.native_group_norm.default, (x, w, None, 3, 4, 6, 2, 1e-5)
        groups = x.reshape(3, 2, 12)
    ctx = _ctx(op, args, r)
    (rx,) = NormEpsilon(0.0).relevance(ctx)
    assert rx.shape == x.shape
    assert torch.allclose(rx.sum(), r.sum(), atol=1e-9, rtol=0)
    # conservative per normalised group too (each group's mean subtraction only redistributes within the group)
    rg = rx.reshape(groups.shape).sum(-1)
    assert torch.allclose(rg, r.reshape(groups.shape).sum(-1), atol=1e-9, rtol=0)
    # with a bias, the bias's share y_b R / stab(y) is absorbed: sum R_x = sum (y - b) R / stab(y)
    b = torch.randn(w.shape, generator=gen, dtype=D)
    args_b = (*args[:3], b, *args[4:]) if kind == "layer" else (x, w, b, *args[3:])
    ctx = _ctx(op, args_b, r)
    (rx,) = NormEpsilon(0.0).relevance(ctx)
    y = ctx.out[0]
    bb = b if kind == "layer" else b.reshape(-1, 1)
    assert torch.allclose(rx.sum(), ((y - bb) * r / y).sum(), atol=1e-8, rtol=0)


def test_norm_affine_still_available():
    """The whole-normalisation identity (the former default) stays available by name: R_x = R without a bias."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, generator=gen, dtype=D)
    r = torch.randn(2, 5, generator=gen, dtype=D)
    ctx = _ctx(aten.native_layer_norm.default, (x, [5], torch.randn(5, generator=gen, dtype=D), None, 1e-5), r)
    (rx,) = NormAffine().relevance(ctx)
    assert torch.equal(rx, r)
    assert NormAffine.name == "norm_identity" and NormEpsilon.name == "norm_epsilon"
    for name in ("epsilon", "attnlrp", "cp_lrp", "dynamiclrp"):
        assert isinstance(presets.resolve(name).class_rules["layernorm"], NormEpsilon)
