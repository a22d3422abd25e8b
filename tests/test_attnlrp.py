"""Issue 3 acceptance: AttnLRP / CP-LRP on transformer blocks equal hand-written references of the equations, a
Llama-style block (RMSNorm identity, uniform SiLU gate, rotary routing), conservation, and a DynamicLRP-configured
small ViT."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynlrp_fx as dynlrp
from dynlrp_fx import presets
from dynlrp_fx.rules import stabilize
from tests.test_rules import _sdpa_reference

D = torch.float64
EPS = 1e-6


# --- reference rules (AttnLRP, Achtibat et al. 2024), written out ---------------------------------------------
def _stab(z, eps):
    return stabilize(z, eps) if eps else torch.where(z == 0, torch.ones_like(z), z)


def ref_linear(x, lin: nn.Linear, r, eps):
    """epsilon rule: R_x = x * W^T (R / stab(x W^T + b))."""
    z = F.linear(x, lin.weight, lin.bias)
    return x * ((r / _stab(z, eps)) @ lin.weight)


def ref_scale(z, r, eps):
    """epsilon through a constant rescaling (div by sqrt(d), mul by a buffer): R_x = z R / stab(z)."""
    return z * r / _stab(z, eps)


def ref_add(a, b, r, eps):
    u = r / _stab(a + b, eps)
    return a * u, b * u


def ref_layernorm(x, ln: nn.LayerNorm, r, eps):
    """AttnLRP / LXT (Ali et al. 2022): only the division by the standard deviation is identity (rstd a constant),
    the affine map y = w (x - mean(x)) rstd + b gets epsilon: s = w rstd R / stab(y), R_x = x (s - mean(s))."""
    y = ln(x)
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + ln.eps)
    s = r / _stab(y, eps) * rstd
    if ln.weight is not None:
        s = s * ln.weight
    return x * (s - s.mean(-1, keepdim=True))


def ref_softmax(x, r):
    s = torch.softmax(x, -1)
    return x * (r - s * r.sum(-1, keepdim=True))


def ref_bilinear(a, b, r, eps):
    """uniform-epsilon for o = a @ b: R_a = a * (R / 2 stab(o)) b^T, R_b = b * a^T (R / 2 stab(o))."""
    u = r / (2 * _stab(a @ b, eps))
    return a * (u @ b.transpose(-1, -2)), b * (a.transpose(-1, -2) @ u)


# --- a standard transformer block ----------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d=8, heads=2, bias=True):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d, bias=bias)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=bias) for _ in range(4))
        self.ln2 = nn.LayerNorm(d, bias=bias)
        self.fc1 = nn.Linear(d, 16, bias=bias)
        self.fc2 = nn.Linear(16, d, bias=bias)
        self.head = nn.Linear(d, 3, bias=bias)

    def split(self, t):
        B, T, d = t.shape
        return t.reshape(B, T, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x):
        B, T, d = x.shape
        h = self.ln1(x)
        q, k, v = self.split(self.q(h)), self.split(self.k(h)), self.split(self.v(h))
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), -1)
        x = x + self.o((p @ v).transpose(1, 2).reshape(B, T, d))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(1))


def block_reference(m: Block, x, seed, eps, cp=False):
    """Input relevance of :class:`Block` by the AttnLRP (or CP-LRP) equations; also the softmax's gap
    ``sum R_out - sum R_in`` (the only non-conservative AttnLRP rule without biases)."""
    B, T, d = x.shape
    H, dh = m.heads, d // m.heads
    with torch.no_grad():
        h1 = m.ln1(x)
        q, k, v = m.split(m.q(h1)), m.split(m.k(h1)), m.split(m.v(h1))
        sc = q @ k.transpose(-1, -2)
        s = sc / math.sqrt(dh)
        p = torch.softmax(s, -1)
        a = (p @ v).transpose(1, 2).reshape(B, T, d)
        x1 = x + m.o(a)
        h2 = m.ln2(x1)
        f1 = m.fc1(h2)
        x2 = x1 + m.fc2(F.gelu(f1))
        pooled = x2.mean(1)
        # backward
        r_pooled = ref_linear(pooled, m.head, seed, eps)
        r_x2 = ref_scale(x2 / T, r_pooled[:, None, :].expand(B, T, d) / 1.0, eps) if False else None
        u = r_pooled / _stab(pooled, eps)
        r_x2 = x2 / T * u[:, None, :]
        r_x1a, r_mlp = ref_add(x1, m.fc2(F.gelu(f1)), r_x2, eps)
        r_gelu = ref_linear(F.gelu(f1), m.fc2, r_mlp, eps)
        r_h2 = ref_linear(h2, m.fc1, r_gelu, eps)  # GELU: identity
        r_x1 = r_x1a + ref_layernorm(x1, m.ln2, r_h2, eps)
        r_x, r_attn = ref_add(x, m.o(a), r_x1, eps)
        r_a = ref_linear(a, m.o, r_attn, eps)
        r_o = r_a.reshape(B, T, H, dh).transpose(1, 2)
        if cp:
            u = r_o / _stab(p @ v, eps)
            r_v, r_q, r_k = v * (p.transpose(-1, -2) @ u), torch.zeros_like(q), torch.zeros_like(k)
            gap = torch.zeros(B, dtype=D)
        else:
            r_p, r_v = ref_bilinear(p, v, r_o, eps)
            r_s = ref_softmax(s, r_p)
            gap = r_p.sum((1, 2, 3)) - r_s.sum((1, 2, 3))
            r_sc = ref_scale(s, r_s, eps)
            r_q, r_kt = ref_bilinear(q, k.transpose(-1, -2), r_sc, eps)
            r_k = r_kt.transpose(-1, -2)

        def merge(t):
            return t.transpose(1, 2).reshape(B, T, d)

        r_h1 = ref_linear(h1, m.q, merge(r_q), eps) + ref_linear(h1, m.k, merge(r_k), eps)
        r_h1 = r_h1 + ref_linear(h1, m.v, merge(r_v), eps)
        r_x = r_x + ref_layernorm(x, m.ln1, r_h1, eps)
    return r_x, gap


def _seed(y, t=1):
    s = torch.zeros_like(y)
    s[:, t] = y[:, t]
    return s


@pytest.mark.parametrize("preset", ["attnlrp", "cp_lrp"])
def test_block_equals_attnlrp_reference(preset):
    m = Block().double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))  # non-trivial LayerNorm affine parameters
    x = torch.randn(2, 5, 8, dtype=D)
    ex = dynlrp.compile(m, x, rules=preset, backend="eager")
    e = ex(x, target=1)
    # the presets are LRP-0 (LXT's definition); the epsilon variant is checked too
    ref, _ = block_reference(m, x, _seed(m(x).detach()), 0.0, cp=preset == "cp_lrp")
    assert torch.allclose(e.relevance, ref, atol=1e-6, rtol=0), (e.relevance - ref).abs().max()
    assert e.conservation.error.max() < 1e-10  # the ledger closes
    rules = presets.attnlrp(EPS) if preset == "attnlrp" else presets.cp_lrp(EPS)
    e = dynlrp.compile(m, x, rules=rules, backend="eager")(x, target=1)
    ref, _ = block_reference(m, x, _seed(m(x).detach()), EPS, cp=preset == "cp_lrp")
    assert torch.allclose(e.relevance, ref, atol=1e-6, rtol=0), (e.relevance - ref).abs().max()


@pytest.mark.parametrize("preset", ["attnlrp", "cp_lrp"])
def test_block_conserves_without_biases(preset):
    """Bias-free weights and eps -> 0: the input relevance sums to the logit, except (AttnLRP) for the softmax
    rule's own gap, which the reference computes."""
    m = Block(bias=False).double().eval()
    x = torch.randn(2, 5, 8, dtype=D)
    rules = presets.attnlrp(1e-12) if preset == "attnlrp" else presets.cp_lrp(1e-12)
    e = dynlrp.compile(m, x, rules=rules, backend="eager")(x, target=1)
    _, gap = block_reference(m, x, _seed(m(x).detach()), 1e-12, cp=preset == "cp_lrp")
    seed = e.conservation.seed
    assert ((seed - gap - e.conservation.inputs).abs() / seed.abs()).max() < 1e-4


# --- a Llama-style block -------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def rotate_half(t):
    h = t.shape[-1] // 2
    return torch.cat([-t[..., h:], t[..., :h]], -1)


class LlamaBlock(nn.Module):
    def __init__(self, d=8, heads=2, T=5):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(d, 12, bias=False), nn.Linear(d, 12, bias=False)
        self.down = nn.Linear(12, d, bias=False)
        self.head = nn.Linear(d, 3, bias=False)
        dh = d // heads
        inv = 1.0 / (10000 ** (torch.arange(0, dh, 2).double() / dh))
        ang = torch.arange(T).double()[:, None] * inv[None, :]
        ang = torch.cat([ang, ang], -1)
        self.register_buffer("cos", ang.cos())
        self.register_buffer("sin", ang.sin())

    def split(self, t):
        B, T, d = t.shape
        return t.reshape(B, T, self.heads, d // self.heads).transpose(1, 2)

    def rope(self, t):
        return t * self.cos + rotate_half(t) * self.sin

    def forward(self, x):
        B, T, d = x.shape
        h = self.norm1(x)
        q, k, v = self.rope(self.split(self.q(h))), self.rope(self.split(self.k(h))), self.split(self.v(h))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, d))
        h = self.norm2(x)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return self.head(x[:, -1])


def llama_reference(m: LlamaBlock, x, seed, eps):
    B, T, d = x.shape
    H, dh = m.heads, d // m.heads

    def rmsnorm_ref(norm, t, r):
        """x * rsqrt(...) is a detected normaliser (identity to x); * weight is epsilon through a constant."""
        return ref_scale(norm(t), r, eps)

    def rope_ref(t, r):
        """t cos + rotate_half(t) sin: epsilon add, epsilon through the constant products, rotate_half routes
        (neg: epsilon through -1)."""
        a_, b_ = t * m.cos, rotate_half(t) * m.sin
        ra, rb = ref_add(a_, b_, r, eps)
        ra, rb = ref_scale(a_, ra, eps), ref_scale(b_, rb, eps)
        h = dh // 2
        # rotate_half(t) = cat(-t2, t1): undo the cat, pass the neg by epsilon
        rb1, rb2 = rb[..., :h], rb[..., h:]
        return ra + torch.cat([rb2, ref_scale(-t[..., h:], rb1, eps)], -1)

    def merge(t):
        return t.transpose(1, 2).reshape(B, T, d)

    with torch.no_grad():
        h1 = m.norm1(x)
        q0, k0, v = m.split(m.q(h1)), m.split(m.k(h1)), m.split(m.v(h1))
        q, k = m.rope(q0), m.rope(k0)
        a = merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        x1 = x + m.o(a)
        h2 = m.norm2(x1)
        g, u = F.silu(m.gate(h2)), m.up(h2)
        mlp = m.down(g * u)
        x2 = x1 + mlp
        r_last = ref_linear(x2[:, -1], m.head, seed, eps)
        r_x2 = torch.zeros_like(x2)
        r_x2[:, -1] = r_last
        r_x1, r_mlp = ref_add(x1, mlp, r_x2, eps)
        r_gu = ref_linear(g * u, m.down, r_mlp, eps)
        r_g, r_u = r_gu / 2, r_gu / 2  # uniform rule for the gate product; SiLU: identity
        r_h2 = ref_linear(h2, m.gate, r_g, eps) + ref_linear(h2, m.up, r_u, eps)
        r_x1 = r_x1 + rmsnorm_ref(m.norm2, x1, r_h2)
        r_x, r_attn = ref_add(x, m.o(a), r_x1, eps)
        r_a = ref_linear(a, m.o, r_attn, eps).reshape(B, T, H, dh).transpose(1, 2)
        r_q, r_k, r_v = _sdpa_reference(q, k, v, r_a, causal=True, eps=eps)
        r_q0, r_k0 = rope_ref(q0, r_q), rope_ref(k0, r_k)
        r_h1 = ref_linear(h1, m.q, merge(r_q0), eps) + ref_linear(h1, m.k, merge(r_k0), eps)
        r_h1 = r_h1 + ref_linear(h1, m.v, merge(r_v), eps)
        return r_x + rmsnorm_ref(m.norm1, x, r_h1)


def test_llama_block_equals_reference():
    m = LlamaBlock().double().eval()
    with torch.no_grad():
        m.norm1.weight.add_(0.2 * torch.randn(8, dtype=D))
        m.norm2.weight.add_(0.2 * torch.randn(8, dtype=D))
    x = torch.randn(2, 5, 8, dtype=D)
    ex = dynlrp.compile(m, x, rules="attnlrp", backend="eager")
    table = {r["node"]: r for r in ex.rule_table()}
    # RMSNorm: the x * rsqrt(mean(x^2) + eps) product is a normaliser with the identity rule (nothing leaks into
    # the variance path); the SiLU gate product gets the uniform rule
    norm_rows = [r for r in table.values() if r["module"] == "norm1" and r["rule_class"] == "normalizer"]
    assert norm_rows and all("NormalizerIdentity" in r["rule"] for r in norm_rows)
    gate_rows = [r for r in table.values() if r["rule_class"] == "product"]
    assert len(gate_rows) == 1 and "Uniform" in gate_rows[0]["rule"]
    e = ex(x, target=2)
    ref = llama_reference(m, x, _seed(m(x).detach(), 2), 0.0)  # the preset is LRP-0, as LXT
    assert torch.allclose(e.relevance, ref, atol=1e-6, rtol=0), (e.relevance - ref).abs().max()
    e = dynlrp.compile(m, x, rules=presets.attnlrp(EPS), backend="eager")(x, target=2)
    ref = llama_reference(m, x, _seed(m(x).detach(), 2), EPS)
    assert torch.allclose(e.relevance, ref, atol=1e-6, rtol=0), (e.relevance - ref).abs().max()


# --- DynamicLRP on a small ViT -------------------------------------------------------------------------------
def test_dynamiclrp_small_vit_conserves():
    """torchvision's VisionTransformer (conv patchify, nn.MultiheadAttention -> SDPA, LayerNorm, GELU MLP) under
    the paper's configuration. With bias-free weights, and the class token and position embedding zeroed (they are
    constants: relevance reaching them is absorbed, and ViT reads its logits from the class token), every rule used
    (gamma, CP-LRP, the absolute-value split, normaliser identity) is conservative up to its stabiliser, so the
    input relevance sums to the logit within 1e-3."""
    from torchvision.models import VisionTransformer

    m = (
        VisionTransformer(
            image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=4
        )
        .double()
        .eval()
    )
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.zero_()
        m.heads.head.weight.normal_()  # torchvision initialises the head to zero
        m.class_token.zero_()
        m.encoder.pos_embedding.zero_()
    x = torch.randn(2, 3, 16, 16, dtype=D)
    ex = dynlrp.compile(m, x, rules="dynamiclrp", backend="eager")
    table = ex.rule_table()
    rules = {r["node"]: r["rule"] or "" for r in table}
    assert "gamma=130.0" in rules["convolution"]  # conv_proj
    linear = [r for r in table if r["rule_class"] == "linear" and r["op"] in ("aten.addmm.default", "aten.bmm.default")]
    assert linear and all("gamma=0.001" in r["rule"] for r in linear)  # in/out projections, MLP, head
    assert any("AbsProportional" in r["rule"] for r in table if r["op"] == "aten.add.Tensor")
    assert any("cp=True" in r["rule"] for r in table if r["rule_class"] == "sdpa")
    e = ex(x, target=1)
    c = e.conservation
    assert torch.isfinite(e.relevance).all() and e.relevance.abs().sum() > 0
    assert ((c.seed - c.inputs).abs() / c.seed.abs()).max() < 1e-3
