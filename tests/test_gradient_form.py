"""Issue 16: rules that are modified gradients run as gradients (``pair`` carries ``G`` with ``R = value * G``).

Oracles: the gradient form gives the relevance the relevance form gives (float64, same trace, every preset with a
gradient form, CNNs and transformers, target and seed modes, several targets); LRP-0 in gradient form is the
gradient (no division left in the program of a bias-free ReLU network) and equals gradient x input; the ledger,
read from the output side, closes where the relevance form's (measured) ledger does, and records a bias's share.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import dynlrp_fx as dynlrp
from dynlrp_fx.explainer import Explainer
from dynlrp_fx.passes.memory import peak_live_bytes
from dynlrp_fx.program import Analysis
from tests.helpers import call_args, grad_x_input, pooled_cnn, tiny_bert

D = torch.float64


def _pair(model, args=(), kwargs=None, rules="epsilon"):
    """The default explainer (gradient form) and one on the same trace with every rule in relevance form."""
    ex = dynlrp.compile(model, args, example_kwargs=kwargs, rules=rules)
    ref = Explainer(model, ex.traced, ex.composite,
                    analysis=Analysis(ex.traced, ex.composite, gradient_form=False))
    return ex, ref


def _close(a, b, rtol=1e-9):
    """Relevance equal up to float64 rounding, relative to the largest entry."""
    top = float(b.abs().max())
    assert top > 0
    err = float((a - b).abs().max()) / top
    assert err <= rtol, f"gradient form differs from relevance form by {err:.2e} (relative)"


def _same(a, b, rtol=1e-9):
    _close(a.relevance, b.relevance, rtol)
    for k in b.inputs:
        _close(a.inputs[k], b.inputs[k], rtol)
    # the ledgers are computed differently (output side vs. both sides) and both close
    assert float(a.conservation.error.max()) < 1e-10
    assert float(b.conservation.error.max()) < 1e-10


@pytest.mark.parametrize("rules", ["lrp0", *(pytest.param(r, marks=pytest.mark.slow)
                                             for r in ("epsilon", "epsilon_gamma_box", "epsilon_plus"))])
def test_cnn_forms_agree(rules):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=7).eval().to(D)
    x = torch.randn(2, 3, 32, 32, dtype=D)
    ex, ref = _pair(model, (x,), rules=rules)
    _same(ex(x, target=torch.tensor([3, 5])), ref(x, target=torch.tensor([3, 5])))
    seed = torch.randn(2, 7, dtype=D)
    _same(ex(x, seed=seed), ref(x, seed=seed))


@pytest.mark.parametrize("rules", ["epsilon", *(pytest.param(r, marks=pytest.mark.slow) for r in ("lrp0", "cp_lrp"))])
def test_bert_forms_agree_with_padding(rules):
    torch.manual_seed(0)
    model = tiny_bert(sdpa=True).to(D)
    kw = {"input_ids": torch.randint(3, 128, (2, 10)),
          "attention_mask": torch.tensor([[1] * 10, [1] * 7 + [0] * 3])}
    ex, ref = _pair(model, (), kw, rules)
    _same(ex(**kw, target=1), ref(**kw, target=1))


@pytest.mark.slow
def test_eager_attention_softmax_forms_agree():
    """Decomposed attention (softmax with an additive finfo.min mask, two bilinear matmuls)."""
    torch.manual_seed(0)
    model = tiny_bert().to(D)  # eager attention
    kw = {"input_ids": torch.randint(3, 128, (2, 9)), "attention_mask": torch.tensor([[1] * 9, [1] * 5 + [0] * 4])}
    for rules in ("epsilon", "cp_lrp"):
        ex, ref = _pair(model, (), kw, rules)
        _same(ex(**kw, target=2), ref(**kw, target=2))


@pytest.mark.slow
def test_gpt2_and_vit_forms_agree():
    import transformers as tf

    torch.manual_seed(0)
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4)).eval().to(D)
    kw = {"input_ids": torch.randint(3, 100, (2, 12))}
    ex, ref = _pair(gpt2, (), kw, "attnlrp")
    _same(ex(**kw, target=7), ref(**kw, target=7))
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                               mlp_dim=32, num_classes=5).eval().to(D)
    nn.init.normal_(vit.heads.head.weight, std=0.1)
    x = torch.randn(2, 3, 32, 32, dtype=D)
    for rules in ("cp_lrp", "dynamiclrp"):
        ex, ref = _pair(vit, (x,), rules=rules)
        _same(ex(x, target=1), ref(x, target=1))


@pytest.mark.parametrize("kv_heads", [4, pytest.param(2, marks=pytest.mark.slow)], ids=["mha", "gqa"])
def test_llama_forms_agree_to_its_float32_casts(kv_heads):
    """Llama's RMSNorm computes in float32 (``hidden.to(torch.float32)``): a cast that rounds a float64 value is a
    route op whose output is not exactly its input, so ``x * G`` and ``y * G`` differ by that rounding there.

    Llama as transformers builds it (``use_cache`` on) concatenates each layer's keys and values to the empty
    (0,)-shaped tensors of a fresh ``DynamicCache``: ``narrow_block_matmuls`` read each ``cat`` operand's size along
    the ``cat`` dim and failed on that 1-D operand where the keys reach a matmul directly (``mha``: as many key-value
    heads as heads; an IndexError found by the issue-16 benchmark on the Llama-style model). Such a ``cat`` is now
    no block, and the relevance form builds."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads)
    model = tf.LlamaForCausalLM(cfg).eval().to(D)
    kw = {"input_ids": torch.randint(3, 100, (2, 12))}
    ex, ref = _pair(model, (), kw, "epsilon")
    a, b = ex(**kw, target=4), ref(**kw, target=4)
    _close(a.relevance, b.relevance, rtol=1e-6)
    assert float(a.conservation.error.max()) < 1e-5


def test_several_targets_in_gradient_form():
    torch.manual_seed(0)
    model = pooled_cnn().to(D)
    x = torch.randn(2, 3, 8, 8, dtype=D)
    ex, ref = _pair(model, (x,), rules="epsilon")
    t = torch.tensor([[0, 3], [4, 1]])
    _close(ex(x, target=t).relevance, ref(x, target=t).relevance)


def _bias_free_relu_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(6, 4, bias=False),
    ).eval().to(D)


def test_lrp0_is_the_gradient_without_divisions():
    """LRP-0 through a bias-free ReLU network in gradient form: no division, no stabiliser, no ledger entry (it
    absorbs nothing), and the relevance equals gradient x input; the relevance form divides at every layer."""
    model = _bias_free_relu_net()
    x = torch.randn(3, 3, 8, 8, dtype=D)
    ex, ref = _pair(model, (x,), rules="lrp0")
    t = torch.tensor([0, 2, 3])
    e = ex(x, target=t)
    torch.testing.assert_close(e.relevance, grad_x_input(model, x, t), rtol=1e-10, atol=1e-12)
    assert float(e.absorbed.abs().max()) == 0.0
    ops = [str(n.target) for n in ex.graph("target").graph.nodes if n.op == "call_function"]
    ref_ops = [str(n.target) for n in ref.graph("target").graph.nodes if n.op == "call_function"]
    # no division by a tensor (the pooling's gradient divides by a number); `where` only in the seed (argmax)
    assert "aten.div.Tensor" not in ops and ops.count("aten.where.self") <= 2, ops
    # no ledger work: a convolution's or matmul's weight multiplies (no constant), so nothing is summed or zeroed
    assert "aten.sum.dim_IntList" not in ops and "aten.zeros_like.default" not in ops, ops
    assert ref_ops.count("aten.div.Tensor") >= 3 and ref_ops.count("aten.where.self") >= 5  # one per safe division


def test_lrp0_through_batch_norm_is_gradient_x_input():
    """LRP-0 in gradient form passes ``G`` through an affine map unchanged, so through inference batch norm (per
    channel statistics, weights and shifts) it is gradient x input too; the shifts' share is in the ledger (seed =
    relevance + absorbed, per sample). Its pullback is a per-channel scale: no ``native_batch_norm_backward``, and
    no batch norm recomputed for the saved statistics that call would read."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
        nn.Conv2d(5, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).eval().to(D)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t in (m.running_mean, m.weight, m.bias):
                    t.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    x = torch.randn(3, 3, 8, 8, dtype=D)
    ex = dynlrp.compile(model, (x,), rules="lrp0")
    t = torch.tensor([0, 2, 1])
    e = ex(x, target=t)
    torch.testing.assert_close(e.relevance, grad_x_input(model, x, t), rtol=1e-10, atol=1e-12)
    seed = model(x).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(e.relevance.flatten(1).sum(1) + e.absorbed, seed, rtol=1e-10, atol=1e-12)
    assert float(e.absorbed.abs().min()) > 1e-6  # the shifts take a share in every sample
    ops = [str(n.target) for n in ex.graph("target").graph.nodes if n.op == "call_function"]
    assert "aten.native_batch_norm_backward.default" not in ops, ops


def test_ledger_records_bias_and_epsilon_shares():
    """The output-side ledger equals what the relevance form measures at every op (biases, batch-norm shifts,
    stabilisers), per sample."""
    torch.manual_seed(0)
    model = pooled_cnn().to(D)  # biased convs, batch norm, biased linear
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 3, 8, 8, dtype=D)
    for rules in ("lrp0", "epsilon"):
        ex, ref = _pair(model, (x,), rules=rules)
        a, b = ex(x), ref(x)
        assert float(b.absorbed.abs().min()) > 1e-6  # the biases absorb something in every sample
        torch.testing.assert_close(a.absorbed, b.absorbed, rtol=1e-9, atol=1e-12)


def test_program_without_the_ledger_gives_the_same_relevance():
    """``Analysis(ledger=False)`` (what ``benchmarks.gradient_form --ledger`` times the ledger's cost against) leaves
    out every ledger entry and nothing else: the relevance is the same to the bit, ``absorbed`` reads 0, and the
    program has fewer ops."""
    torch.manual_seed(0)
    model = pooled_cnn().to(D)
    x = torch.randn(3, 3, 8, 8, dtype=D)
    ex = dynlrp.compile(model, (x,), rules="epsilon")
    bare = Explainer(model, ex.traced, ex.composite, analysis=Analysis(ex.traced, ex.composite, ledger=False))
    a, b = ex(x, target=1), bare(x, target=1)
    assert torch.equal(a.relevance, b.relevance)
    assert float(a.absorbed.abs().min()) > 0 and not b.absorbed.any()

    def ops(e):
        return sum(1 for n in e.graph("target").graph.nodes if n.op == "call_function")

    assert ops(bare) < ops(ex)


class _BiasAdd(nn.Module):
    """A matmul and a separate bias add on a 3-d input (the layout MultiheadAttention's projections trace to)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6))
        self.b = nn.Parameter(torch.randn(6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(x @ self.w + self.b).mean(1))


def test_bias_parameter_share_is_summed_without_the_inf_guard():
    """An ``add`` may add a mask of ``-inf``, so its ledger share is guarded (``nan_to_num`` of a product of the
    output's size); a parameter added there is finite, and its share is summed like a linear layer's bias (no
    output-sized product). The ledger equals the relevance form's, measured on both sides."""
    torch.manual_seed(0)
    model = _BiasAdd().to(D)
    x = torch.randn(3, 5, 4, dtype=D)
    ex, ref = _pair(model, (x,), rules="epsilon")
    a, b = ex(x, target=1), ref(x, target=1)
    torch.testing.assert_close(a.absorbed, b.absorbed, rtol=1e-9, atol=1e-12)
    assert float(a.absorbed.abs().min()) > 1e-6
    ops = [n.target for n in ex.graph("target").graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.nan_to_num.default not in ops


class _PostNorm(nn.Module):
    """A residual stream of post-LayerNorm blocks, ``x = LN(x + gelu(W x))`` (BERT's layout), then a GroupNorm'd
    1-d convolution and a linear head: every norm with a bias."""

    def __init__(self, width: int = 16, depth: int = 3):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.conv = nn.Conv1d(width, width, 1)
        self.gn = nn.GroupNorm(2, width)
        self.head = nn.Linear(width, 3)
        with torch.no_grad():
            for m in [*self.norms, self.gn]:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)

    def forward(self, x):  # (B, T, width)
        for fc, norm in zip(self.fcs, self.norms):
            x = norm(x + torch.nn.functional.gelu(fc(x)))
        x = self.gn(self.conv(x.transpose(1, 2))).transpose(1, 2)
        return self.head(x.mean(1))


@pytest.mark.parametrize("rules", ["attnlrp", "epsilon"])
def test_norm_ledger_is_read_from_the_output_side(rules):
    """AttnLRP's LayerNorm / GroupNorm rule in gradient form records what it absorbs (the bias's share ``b * u``,
    and ``eps * t * y`` with a stabiliser) from the output side: per sample equal to what the relevance form
    measures (``sum R_y - sum R_x``). Without a stabiliser the program then reads only the norms' ``rstd``, which is
    held: no LayerNorm or GroupNorm is recomputed (before, the ledger read each norm's input and output, and along
    the residual stream each recomputation recomputed the norms before it)."""
    torch.manual_seed(0)
    model = _PostNorm().to(D).eval()
    x = torch.randn(3, 5, 16, dtype=D)
    ex, ref = _pair(model, (x,), rules=rules)
    a, b = ex(x), ref(x)
    _close(a.relevance, b.relevance)
    assert float(b.absorbed.abs().min()) > 1e-6  # the norms' biases absorb something in every sample
    torch.testing.assert_close(a.absorbed, b.absorbed, rtol=1e-9, atol=1e-12)
    assert float(a.conservation.error.max()) < 1e-10
    if rules == "attnlrp":
        nodes = ex.graph("target").graph.nodes
        norms = [n for n in nodes if n.op == "call_function"
                 and n.target in (torch.ops.aten.native_layer_norm.default, torch.ops.aten.native_group_norm.default)]
        assert len(norms) == 4, [n.name for n in norms]


def test_model_untouched_and_params_keep_relevance_form():
    """``params=`` needs relevance at each parameter's op, so that program keeps the relevance form; its results
    equal the relevance-form reference."""
    model = _bias_free_relu_net()
    x = torch.randn(2, 3, 8, 8, dtype=D)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ex = dynlrp.compile(model, (x,), rules="lrp0", params=["0.weight"])
    e = ex(x, target=1)
    torch.testing.assert_close(e.relevance, grad_x_input(model, x, torch.tensor([1, 1])), rtol=1e-10, atol=1e-12)
    assert float(e.params["0.weight"].sum()) == pytest.approx(float(e.relevance.sum()), rel=1e-9)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


class _TinyHead(nn.Module):
    """Token features -> ReLU layer -> a head over a vocabulary of 13 on every position: ``(B, T, 13)``, the shape
    of a language model's logits (the head is ``mm`` or, with a bias, ``addmm`` on the ``(B*T, E)`` rows)."""

    def __init__(self, bias: bool):
        super().__init__()
        self.fc = nn.Linear(6, 6, bias=bias)
        self.head = nn.Linear(6, 13, bias=bias)

    def forward(self, x):
        return self.head(torch.relu(self.fc(x)))


def _dense_head_pullbacks(ex, vocab: int) -> list:
    """``mm`` nodes of the program whose first operand has the vocabulary as its last dim: the dense pullback of
    a one-hot seed through the head (``(B*T, V) @ (V, E)``)."""
    return [n for n in ex.graph("target").graph.nodes
            if n.op == "call_function" and n.target is torch.ops.aten.mm.default
            and n.args[0].meta["val"].shape[-1] == vocab]


@pytest.mark.parametrize("bias", [False, True])
def test_one_hot_seed_pulls_back_through_the_head_as_rows(bias):
    """The target's one-hot seed reaches the head as one non-zero per sample, so its pullback is one row of the
    weight per sample, not a dense ``(B*T, V) @ (V, E)`` product (an LM head costs as much as its forward). The
    relevance equals the relevance form's (LRP-0 and epsilon, explicit and argmax targets), LRP-0 on the bias-free
    head equals gradient x input, and the ledger, which records the head's bias and stabiliser per sample, closes."""
    torch.manual_seed(0)
    model = _TinyHead(bias).to(D)
    x = torch.randn(3, 5, 6, dtype=D)
    target = torch.tensor([0 * 13 + 4, 3 * 13 + 12, 4 * 13 + 0])  # (position, token) per sample, flattened
    for rules in ("lrp0", "epsilon"):
        ex, ref = _pair(model, (x,), rules=rules)
        assert not _dense_head_pullbacks(ex, 13)
        assert _dense_head_pullbacks(ref, 13)  # the relevance form still multiplies the dense seed
        for t in (target, None):
            a, b = ex(x, target=t), ref(x, target=t)
            _same(a, b)
            torch.testing.assert_close(a.absorbed, b.absorbed, rtol=1e-9, atol=1e-12)
            seed = model(x).flatten(1).gather(1, (t if t is not None else model(x).flatten(1).argmax(1))[:, None])
            torch.testing.assert_close(a.relevance.flatten(1).sum(1) + a.absorbed, seed[:, 0], rtol=1e-10, atol=1e-12)
            if bias:
                assert float(a.absorbed.abs().min()) > 1e-6  # the biases' share is recorded in every sample
            elif rules == "lrp0" and t is not None:
                torch.testing.assert_close(a.relevance, grad_x_input(model, x, t), rtol=1e-10, atol=1e-12)


def test_one_hot_head_rows_with_several_targets_in_one_sweep():
    """K targets widened into one relevance sweep (``sweep_batch`` = all rows) take the same row pullback at the
    head: each (sample, target) row equals a single-target call (the rows are found per sample, so nothing depends
    on a range over the batch, which the sweep would repeat instead of re-count)."""
    torch.manual_seed(0)
    model = _TinyHead(True).to(D)
    x = torch.randn(2, 5, 6, dtype=D)
    ex = dynlrp.compile(model, (x,), rules="epsilon")
    assert not _dense_head_pullbacks(ex, 13)
    t = torch.tensor([[4, 20, 64], [13, 0, 33]])
    multi = ex(x, target=t, sweep_batch=6)
    for j in range(3):
        single = ex(x, target=t[:, j])
        torch.testing.assert_close(multi.relevance[:, j], single.relevance, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(multi.absorbed[:, j], single.absorbed, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape,keep", [((6, 5), None), ((6, 5), 0), ((2, 3, 5), 0), ((2, 3, 5), 1), ((4, 5), 1)])
def test_bias_ledger_sums_with_one_matrix_vector_product(shape, keep):
    """What a bias along the last dim absorbed, ``sum s * b`` per row or per ``keep`` index, is one ``s @ b``
    (no product of ``s``'s size) unless the kept dim is the bias's: the same sums as multiplying out."""
    from dynlrp_fx.rules.core import _dot, _reduce

    g = torch.Generator().manual_seed(0)
    s, c = torch.randn(shape, generator=g, dtype=D), torch.randn(5, generator=g, dtype=D)
    want = (s * c).sum(-1) if keep is None else _reduce(s * c, keep)
    torch.testing.assert_close(_dot(s, c, keep), want, rtol=1e-12, atol=1e-12)


def test_linear_layer_bias_ledger_is_a_matrix_vector_product():
    """A linear layer over (batch, tokens, features) rows: its bias share in the program is an ``mv``."""
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).to(D).eval()
    ex = dynlrp.compile(model, torch.randn(2, 4, 5, dtype=D), rules="lrp0", backend="eager")
    assert any("aten.mv" in str(n.target) for n in ex.graph("target").graph.nodes)


class _GammaNet(nn.Module):
    """conv -> ReLU -> conv (+ skip) -> ReLU -> pool -> linear: the second convolution feeds an add, so its output
    relevance may be non-zero where its value is negative (gamma's two-sided path); the first feeds a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.c3 = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c3(h) + self.c2(torch.relu(self.c2(h))))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("rules", ["epsilon_gamma_box", "epsilon_plus"])
def test_gamma_and_zplus_run_in_gradient_form_on_nonnegative_inputs(rules):
    """Gamma and z+ on a ReLU output are ``x * c``: in gradient form they hand ``c`` on, so no relevance is turned
    back into ``G`` by dividing by the ReLU output (``where(x == 0, 0, R / x)``) at their inputs; the relevance is
    the relevance form's (both of gamma's paths: a convolution before a ReLU and one before an add)."""
    torch.manual_seed(0)
    model = _GammaNet().eval().to(D)
    x = torch.randn(3, 3, 8, 8, dtype=D)
    ex, ref = _pair(model, (x,), rules=rules)
    t = torch.tensor([0, 2, 3])
    _same(ex(x, target=t), ref(x, target=t))
    seed = torch.randn(3, 4, dtype=D)
    _same(ex(x, seed=seed), ref(x, seed=seed))

    def count(e, op):
        return sum(1 for n in e.graph("target").graph.nodes if n.target is op)

    # the conversion R -> G at a ReLU output is where(x == 0, 0, R / x); `where` otherwise only in the seed
    assert count(ex, torch.ops.aten.eq.Scalar) == 0
    assert count(ex, torch.ops.aten.where.self) <= 2
    # the ledger entry read from the output side (u * (stab(d) - d) + bias shares) is the measured one
    e, r = ex(x, target=t), ref(x, target=t)
    torch.testing.assert_close(e.absorbed, r.absorbed, rtol=1e-9, atol=1e-12)
    assert float(e.absorbed.abs().min()) > 0
    if rules == "epsilon_gamma_box":
        # and the rule's input dies before the pullbacks (measured, the entry kept it for sum x * G_x after them:
        # +17% peak on VGG16 at batch 2, +6% here). z+ holds z * G beside its stabiliser's temporaries instead of the
        # relevance, one activation more than the relevance form on this net (3.6%), none on VGG16
        peak = {k: peak_live_bytes(v.graph("target"), *call_args(v, (x,), {}, t))[0]
                for k, v in (("g", ex), ("r", ref))}
        assert peak["g"] <= peak["r"], peak


def test_divide_zero_at_zero_equals_the_safe_division():
    from dynlrp_fx.rules.base import divide_zero_at_zero, safe_divide

    # (infinite x differ: f(inf) / inf is NaN, which the safe division keeps and this reads as 0)
    x = torch.tensor([0.0, -0.0, 1e-300, -1e-300, -2.5, 3.0, 40.0], dtype=D)
    for f in (torch.nn.functional.gelu, torch.nn.functional.silu, torch.tanh):
        y = f(x)
        torch.testing.assert_close(divide_zero_at_zero(y, x), safe_divide(y, x, 0.0), equal_nan=True)
        assert float(divide_zero_at_zero(y, x)[0]) == 0.0 == float(divide_zero_at_zero(y, x)[1])


@pytest.mark.parametrize("act", [nn.GELU(), nn.Tanh()], ids=["gelu", "tanh"])
def test_identity_rule_ratio_is_zero_at_exact_zeros(act):
    """The identity rule in gradient form hands on ``G * f(x) / x``, read as 0 where ``x == 0`` (``R_x = R_y = 0``
    there, and the relevance form's ``R / x`` is 0 by the same convention). The program writes the quotient's
    ``0 / 0`` as one ``nan_to_num`` pass instead of an ``x == 0`` mask and a ``where``; a unit whose
    pre-activation is exactly 0 (``x_0 - x_1`` on inputs with ``x_0 == x_1``) then passes nothing back, as in the
    relevance form: ``f(x) / x`` tends to ``f'(0) != 0`` there, which would hand ``+-G f'(0) x_0`` to the two
    inputs. (SiLU is traced as ``x * sigmoid(x)``, a product whose gate is detached: its gradient form hands on
    ``G * sigmoid(x)``, as LXT does.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), act, nn.Linear(6, 3)).eval().to(D)
    with torch.no_grad():
        model[0].weight[0] = torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=D)
        model[0].bias[0] = 0.0
    x = torch.randn(3, 4, dtype=D)
    x[:, 1] = x[:, 0]
    ex, ref = _pair(model, (x,), rules="lrp0")
    with torch.no_grad():
        assert float(model[0](x)[:, 0].abs().max()) == 0.0
    got, want = ex(x, target=1), ref(x, target=1)
    _same(got, want)
    ops = [n.target for n in ex.graph("target").graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.nan_to_num.default in ops and torch.ops.aten.eq.Scalar not in ops, ops
    # the unit passes nothing back: the same relevance with its weights zeroed (f(x) / x -> f'(0) at x = 0 would
    # hand +-G f'(0) x_0 to the two inputs, which zeroing the weights removes)
    with torch.no_grad():
        model[0].weight[0] = 0.0
    _close(ex(x, target=1).relevance, got.relevance, rtol=1e-12)


class _Attention(nn.Module):
    """One attention layer over a long sequence: q, k, v and output projections around SDPA, whose (B, H, L, L)
    scores dwarf every other value."""

    def __init__(self, dim: int = 16, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        b, n, e = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).reshape(b, n, e)).mean(1)


@pytest.mark.parametrize("rules", ["epsilon", "attnlrp"])
def test_attention_sweep_holds_two_score_sized_buffers(rules):
    """AttnLRP's attention rule in gradient form: ``p * (G_p - rowsum(p * G_p))`` scaled by ``q k^T``'s epsilon
    reads the scores at the end, so scores, probabilities and ``G_p`` were alive at once (three (B, H, L, L)
    buffers; ViT-B/16's peak under ``epsilon``). It is now ``scaled(p) * (G_p - c)`` with ``c = rowsum(G_o * o)``
    (the same number: ``p G_p^T = G_o (p v)^T``), ``p`` scaled once the softmax has read the scores: at most two
    such buffers, on the program as it runs eagerly (in-place ops included). Relevance: the relevance form's (float64;
    the forms-agree tests above cover masks, GQA and causal attention)."""
    torch.manual_seed(0)
    model = _Attention().eval()
    x = torch.randn(1, 256, 16)
    ex = dynlrp.compile(model, (x,), rules=rules, backend="eager", cache=False)
    scores = 4 * 256 * 256 * 4  # (B, H, L, L) float32
    peak, _ = peak_live_bytes(ex.program("target").fn, *call_args(ex, (x,), {}))
    assert 1.5 * scores < peak <= 2.25 * scores, peak / scores
    model, x = model.double(), x.double()
    ex, ref = _pair(model, (x,), rules=rules)
    _same(ex(x, target=1), ref(x, target=1))
