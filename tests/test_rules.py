"""Issue 3: every rule of the library against its formula on a small op (float64), and Zennit's rules on a
single layer. Rules run directly on a :class:`RuleContext` (no compilation), so these tests are fast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zennit import rules as zrules

from dynlrp_fx.rules import (
    AbsProportional,
    AlphaBeta,
    AttnLRPAttention,
    AttnLRPSoftmax,
    CPBilinear,
    Epsilon,
    Flat,
    Gamma,
    GradientTimesInput,
    Pass,
    RuleContext,
    Uniform,
    WSquare,
    ZBox,
    ZPlus,
    stabilize,
)

aten = torch.ops.aten
EPS = 1e-6
D = torch.float64


def _dense(seed=0, n=3, i=5, o=4, positive=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, i, generator=g, dtype=D)
    if positive:
        x = x.abs()
    w = torch.randn(o, i, generator=g, dtype=D)
    b = torch.randn(o, generator=g, dtype=D) * 0.3
    r = torch.randn(n, o, generator=g, dtype=D)
    return x, w, b, r


def _addmm_ctx(x, w, b, r):
    out = aten.addmm.default(b, x, w.t())
    return RuleContext(aten.addmm.default, (b, x, w.t()), {}, out, r, [(1,)], [(1,)])


def _zterms(x, w, b):
    """z_ij = x_i w_ji per (sample, out, in)."""
    return torch.einsum("ni,oi->noi", x, w)


def _lin(x, w, b=None):
    return x @ w.t() + (0 if b is None else b)


def test_epsilon_formula():
    x, w, b, r = _dense()
    (got,) = Epsilon(EPS).relevance(_addmm_ctx(x, w, b, r))
    z = _lin(x, w, b)
    ref = (_zterms(x, w, b) * (r / stabilize(z, EPS))[:, :, None]).sum(1)
    assert torch.allclose(got, ref, atol=1e-12)


def test_gamma_formula_positive_inputs():
    """Original gamma rule for x >= 0 and z > 0: R_i = sum_j x_i (w_ij + g w_ij^+) / sum_i (...) R_j."""
    x, w, b, r = _dense(positive=True)
    b = torch.zeros_like(b)
    g = 0.25
    (got,) = Gamma(g, EPS).relevance(_addmm_ctx(x, w, b, r))
    wg = w + g * w.clamp(min=0)
    wgn = w + g * w.clamp(max=0)
    z = _lin(x, w, b)
    pos = (z > 0).to(D)
    num_p = _zterms(x, wg, b)
    num_n = _zterms(x, wgn, b)
    ref = (num_p * (pos * r / stabilize(num_p.sum(-1), EPS))[:, :, None]).sum(1)
    ref = ref + (num_n * ((1 - pos) * r / stabilize(num_n.sum(-1), EPS))[:, :, None]).sum(1)
    assert torch.allclose(got, ref, atol=1e-12)


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda: Gamma(0.25, EPS), lambda: zrules.Gamma(0.25, EPS)),
        (lambda: Gamma(2.0, EPS), lambda: zrules.Gamma(2.0, EPS)),
        (lambda: ZPlus(EPS), lambda: zrules.ZPlus(EPS)),
        (lambda: AlphaBeta(2.0, 1.0, EPS), lambda: zrules.AlphaBeta(2.0, 1.0, EPS)),
        (lambda: AlphaBeta(1.0, 0.0, EPS), lambda: zrules.AlphaBeta(1.0, 0.0, EPS)),
        (lambda: ZBox(-2.0, 2.0, EPS), lambda: zrules.ZBox(-2.0, 2.0, EPS)),
        (lambda: Flat(EPS), lambda: zrules.Flat(EPS)),
        (lambda: WSquare(EPS), lambda: zrules.WSquare(EPS)),
        (lambda: Epsilon(EPS), lambda: zrules.Epsilon(EPS)),
    ],
    ids=["gamma", "gamma2", "zplus", "alpha2beta1", "alpha1beta0", "zbox", "flat", "wsquare", "epsilon"],
)
@pytest.mark.parametrize("layer", ["linear", "conv"])
@pytest.mark.parametrize("nonneg", [False, True], ids=["mixed", "nonneg"])
def test_rule_equals_zennit_on_one_layer(ours, theirs, layer, nonneg):
    """Mixed-sign inputs, weights and biases: each rule equals Zennit's hook on a single layer. ``nonneg``: the
    input is >= 0 and declared so (as the passes do after a ReLU), which takes the rules' fast paths."""
    g = torch.Generator().manual_seed(3)
    if layer == "linear":
        mod = nn.Linear(6, 4).double()
        x = torch.randn(3, 6, generator=g, dtype=D)
    else:
        mod = nn.Conv2d(3, 4, 3, padding=1, stride=2).double()
        x = torch.randn(2, 3, 5, 5, generator=g, dtype=D)
    if nonneg:
        x = x.relu()
    with torch.no_grad():
        mod.bias.normal_(0, 0.5, generator=g)
        out = mod(x)
    r = torch.randn(out.shape, generator=g, dtype=D)
    # Zennit
    hook = theirs()
    handles = hook.register(mod)
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(mod(xr), xr, r)
    handles.remove()
    # ours, on the ATen op
    if layer == "linear":
        ctx = _addmm_ctx(x, mod.weight.detach(), mod.bias.detach(), r)
    else:
        args = (x, mod.weight.detach(), mod.bias.detach(), [2, 2], [1, 1], [1, 1], False, [0, 0], 1)
        ctx = RuleContext(aten.convolution.default, args, {}, aten.convolution.default(*args), r, [(0,)], [(0,)])
    if nonneg:
        ctx.meta["nonneg_slots"] = tuple(ctx.slots)
    (got,) = ours().relevance(ctx)
    assert torch.allclose(got, ref, atol=1e-10, rtol=1e-8)


def test_zbox_per_channel_bounds():
    x = torch.rand(2, 3, 4, 4, dtype=D)
    conv = nn.Conv2d(3, 2, 3, padding=1).double()
    low = torch.tensor([-0.5, -1.0, -2.0], dtype=D)
    high = torch.tensor([1.0, 2.0, 3.0], dtype=D)
    with torch.no_grad():
        out = conv(x)
    r = torch.randn_like(out)
    args = (x, conv.weight.detach(), conv.bias.detach(), [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    (got,) = ZBox(low, high).relevance(RuleContext(aten.convolution.default, args, {}, out, r, [(0,)], [(0,)]))
    hook = zrules.ZBox(low.view(1, 3, 1, 1), high.view(1, 3, 1, 1))
    h = hook.register(conv)
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(conv(xr), xr, r)
    h.remove()
    assert torch.allclose(got, ref, atol=1e-10)
    with pytest.raises(ValueError, match="does not broadcast"):
        ZBox(torch.zeros(5), 1.0).relevance(RuleContext(aten.convolution.default, args, {}, out, r, [(0,)], [(0,)]))


def test_alpha_beta_validates():
    with pytest.raises(ValueError, match="alpha - beta"):
        AlphaBeta(2.0, 2.0)
    with pytest.raises(ValueError, match=">= 0"):
        AlphaBeta(0.5, -0.5)


def test_weight_rules_fall_back_to_epsilon_without_weight():
    """sum / avg_pool / add have no weight operand: gamma etc. equal epsilon there (Zennit's Norm)."""
    a, c = torch.randn(2, 3, dtype=D), torch.randn(2, 3, dtype=D)
    r = torch.randn(2, 3, dtype=D)
    ctx = RuleContext(aten.add.Tensor, (a, c), {}, a + c, r, [(0,), (1,)], [])
    ref = Epsilon(EPS).relevance(ctx)
    for rule in (Gamma(0.25, EPS), ZPlus(EPS), AlphaBeta(2, 1, EPS), Flat(EPS), WSquare(EPS), ZBox(-1, 1, EPS)):
        got = rule.relevance(ctx)
        assert all(torch.allclose(g, e) for g, e in zip(got, ref))
    assert torch.allclose(ref[0], a * r / stabilize(a + c, EPS))


def test_pass_rule():
    x = torch.randn(2, 3, dtype=D)
    r = torch.randn(2, 3, dtype=D)
    ctx = RuleContext(aten.mul.Tensor, (x, 2.0), {}, x * 2.0, r, [(0,)], [(0,)])
    (got,) = Pass().relevance(ctx)
    assert torch.equal(got, r)


def test_uniform_rule_splits_gate_products():
    a, g = torch.randn(2, 4, dtype=D), torch.randn(2, 4, dtype=D)
    r = torch.randn(2, 4, dtype=D)
    got = Uniform().relevance(RuleContext(aten.mul.Tensor, (a, g), {}, a * g, r, [(0,), (1,)], [(0,), (1,)]))
    assert torch.allclose(got[0], r / 2) and torch.allclose(got[1], r / 2)


def test_softmax_rule_formula():
    x = torch.randn(2, 5, dtype=D)
    x[0, 1] = float("-inf")  # a masked entry: zero relevance, not NaN
    s = torch.softmax(x, -1)
    r = torch.randn(2, 5, dtype=D)
    (got,) = AttnLRPSoftmax().relevance(RuleContext(aten._softmax.default, (x, -1, False), {}, s, r, [(0,)]))
    ref = x * (r - s * r.sum(-1, keepdim=True))
    ref[0, 1] = 0.0
    assert torch.allclose(got, ref, atol=1e-12) and not got.isnan().any()


def test_bilinear_uniform_epsilon_and_cp():
    """q k^T and p v with two data operands: each gets x * J^T(R / (2 stab(z))); CP-LRP: all to the second."""
    p, v = torch.rand(2, 3, 4, dtype=D), torch.randn(2, 4, 5, dtype=D)
    o = p @ v
    r = torch.randn_like(o)
    ctx = RuleContext(aten.bmm.default, (p, v), {}, o, r, [(0,), (1,)], [(0,), (1,)])
    rp, rv = Epsilon(EPS).relevance(ctx)
    u = r / stabilize(o, EPS)
    assert torch.allclose(rp, p * (u @ v.transpose(1, 2)) / 2, atol=1e-12)
    assert torch.allclose(rv, v * (p.transpose(1, 2) @ u) / 2, atol=1e-12)
    cp_p, cp_v = CPBilinear(EPS).relevance(ctx)
    assert cp_p is None
    assert torch.allclose(cp_v, v * (p.transpose(1, 2) @ u), atol=1e-12)


def test_abs_proportional_add_and_sum():
    a, c = torch.randn(2, 3, dtype=D), torch.randn(1, 3, dtype=D)
    r = torch.randn(2, 3, dtype=D)
    ra, rc = AbsProportional().relevance(RuleContext(aten.add.Tensor, (a, c), {}, a + c, r, [(0,), (1,)], []))
    den = a.abs() + c.abs()
    assert torch.allclose(ra, a.abs() / den * r)
    assert torch.allclose(rc, (c.abs() / den * r).sum(0, keepdim=True))
    assert torch.allclose(ra.sum() + rc.sum(), r.sum())  # conservative
    x = torch.randn(2, 3, 4, dtype=D)
    rs = torch.randn(2, 4, dtype=D)
    (rx,) = AbsProportional().relevance(RuleContext(aten.mean.dim, (x, [1]), {}, x.mean(1), rs, [(0,)], []))
    assert torch.allclose(rx, x.abs() / x.abs().sum(1, keepdim=True) * rs[:, None, :])


@pytest.mark.parametrize("fn", [F.gelu, torch.tanh, torch.sigmoid])
def test_gradient_times_input_rule(fn):
    """With R_z = z * g the rule returns x * J^T g (the gradient times the input)."""
    x = torch.randn(3, 4, dtype=D)
    z = fn(x)
    g = torch.randn(3, 4, dtype=D)
    op = {F.gelu: aten.gelu.default, torch.tanh: aten.tanh.default, torch.sigmoid: aten.sigmoid.default}[fn]
    (got,) = GradientTimesInput().relevance(RuleContext(op, (x,), {}, z, z * g, [(0,)]))
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(fn(xr), xr, g)
    assert torch.allclose(got, x * ref, atol=1e-12)


def _sdpa_reference(q, k, v, r, mask=None, causal=False, eps=EPS, cp=False):
    """The AttnLRP equations written out: o = p v (uniform-epsilon), softmax deep Taylor, s = q k^T / sqrt(d)."""
    scale = 1 / math.sqrt(q.shape[-1])
    sc = torch.einsum("bhld,bhsd->bhls", q, k) * scale
    s = sc
    if causal:
        L, S = sc.shape[-2:]
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        s = s + mask
    p = torch.softmax(s, -1)
    o = torch.einsum("bhls,bhsd->bhld", p, v)
    u = r / stabilize(o, eps)
    if cp:
        return None, None, v * torch.einsum("bhls,bhld->bhsd", p, u)
    rv = v * torch.einsum("bhls,bhld->bhsd", p, u) / 2
    rp = p * torch.einsum("bhld,bhsd->bhls", u, v) / 2
    term = rp - p * rp.sum(-1, keepdim=True)
    rs = torch.where(torch.isinf(s) | (term == 0), torch.zeros_like(s), s * term)
    if mask is not None:  # the add of the constant mask: epsilon, the mask's share absorbed
        rs = sc * rs / stabilize(sc + mask, eps)
    us = rs / stabilize(sc, eps) / 2
    rq = q * torch.einsum("bhls,bhsd->bhld", us, k) * scale
    rk = k * torch.einsum("bhls,bhld->bhsd", us, q) * scale
    return rq, rk, rv


@pytest.mark.parametrize("mode", ["plain", "causal", "finfo_mask", "cp"])
def test_sdpa_rules_match_reference(mode):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 4, 3, generator=g, dtype=D) for _ in range(3))
    mask = None
    kwargs = {}
    if mode == "causal":
        kwargs["is_causal"] = True
    if mode == "finfo_mask":
        mask = torch.zeros(2, 1, 4, 4, dtype=D)
        mask[1, :, :, 2:] = torch.finfo(D).min  # padding of the second sample
        kwargs["attn_mask"] = mask
    o = F.scaled_dot_product_attention(q, k, v, **kwargs)
    r = torch.randn(o.shape, generator=g, dtype=D)
    ctx = RuleContext(aten.scaled_dot_product_attention.default, (q, k, v), kwargs, o, r, [(0,), (1,), (2,)])
    got = AttnLRPAttention(EPS, cp=mode == "cp").relevance(ctx)
    ref = _sdpa_reference(q, k, v, r, mask=mask, causal=mode == "causal", cp=mode == "cp")
    for a, b in zip(got, ref):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
            continue
        assert not a.isnan().any()
        assert torch.allclose(a, b, atol=1e-10), (a - b).abs().max()
