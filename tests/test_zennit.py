"""Issue 3 acceptance: our Zennit-named presets equal Zennit's composites on torchvision CNNs (float64).

Zennit is the oracle: the same one-hot seed is given to Zennit's ``Gradient`` attributor (as ``grad_output``) and
to our explainer (``seed=``); the input relevance must agree to 1e-4 of ``max |R|`` (we measure ~1e-15 on VGG /
AlexNet and ~1e-13 on ResNet-18).

ResNet-18 note: Zennit's ``SequentialMergeBatchNorm`` folds a batch norm into the convolution and then leaves the
batch norm computing ``x / sqrt(1 + eps)`` (running stats reset to 0/1, ``eps`` kept), so Zennit's canonized
forward differs from the model's by a factor ``1 - eps/2`` per batch norm; our fold removes the batch norm
exactly. With ``eps = 1e-5`` this alone moves Zennit's relevance by ~1e-4 relative, so the ResNet comparisons set
``bn.eps = 1e-12`` (with running variances >= 0.5), which makes the difference negligible (torch < 2.13 rejects
``eps = 0``).
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from zennit.attribution import Gradient
from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer

import dynlrp_fx as dynlrp
from dynlrp_fx import presets
from dynlrp_fx.rules import Epsilon
from dynlrp_fx.rules.composite import Composite, default_class_rules

LOW, HIGH = -3.0, 3.0

COMPOSITES = {
    "epsilon_gamma_box": (
        lambda can: EpsilonGammaBox(low=LOW, high=HIGH, canonizers=can),
        lambda: presets.epsilon_gamma_box(LOW, HIGH),
    ),
    "epsilon_plus_flat": (lambda can: EpsilonPlusFlat(canonizers=can), presets.epsilon_plus_flat),
    "epsilon_alpha2_beta1": (lambda can: EpsilonAlpha2Beta1(canonizers=can), presets.epsilon_alpha2_beta1),
}


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial batch-norm statistics (so that folding matters) with a negligible eps (see module doc)."""
    g = torch.Generator().manual_seed(1)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d | nn.BatchNorm1d):
            n = mod.num_features
            mod.running_mean.copy_(torch.rand(n, generator=g, dtype=torch.float64) - 0.5)
            mod.running_var.copy_(torch.rand(n, generator=g, dtype=torch.float64) * 1.5 + 0.5)
            mod.weight.data.copy_(torch.rand(n, generator=g, dtype=torch.float64) + 0.5)
            mod.bias.data.copy_(torch.rand(n, generator=g, dtype=torch.float64) * 0.4 - 0.2)
            mod.eps = 1e-12


def _compare(model: nn.Module, x: torch.Tensor, name: str, canonizers: list) -> float:
    zennit_composite, ours = COMPOSITES[name]
    with torch.no_grad():
        y = model(x)
    seed = torch.zeros_like(y)
    seed[:, 3] = 1.0
    seed[1, 5] = 0.5
    state = {k: v.clone() for k, v in model.state_dict().items()}
    explainer = dynlrp.compile(model, x, rules=ours(), backend="eager")
    ours_r = explainer(x, seed=seed).relevance
    for k, v in model.state_dict().items():  # our fold never touches the model
        assert torch.equal(v, state[k]), k
    with Gradient(model=model, composite=zennit_composite(canonizers)) as attributor:
        _, zennit_r = attributor(x, seed)
    return float((ours_r - zennit_r).abs().max() / zennit_r.abs().max())


def _small_vgg11() -> nn.Module:
    """torchvision vgg11 with its classifier narrowed (4096 -> 64 units) to keep the default test fast; the
    features, adaptive pool, and classifier layer types are torchvision's."""
    m = torchvision.models.vgg11(num_classes=10)
    m.classifier[0] = nn.Linear(512 * 7 * 7, 64)
    m.classifier[3] = nn.Linear(64, 64)
    m.classifier[6] = nn.Linear(64, 10)
    return m.eval().double()


@pytest.mark.parametrize("name", ["epsilon_gamma_box"])
def test_vgg11_features_equal_zennit(name):
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert _compare(_small_vgg11(), x, name, []) <= 1e-4


def test_resnet18_gamma_box_equals_zennit_with_canonizer():
    model = torchvision.models.resnet18(num_classes=10).eval().double()
    _randomize_bn(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert _compare(model, x, "epsilon_gamma_box", [ResNetCanonizer()]) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMPOSITES))
@pytest.mark.parametrize("arch", ["vgg11", "alexnet", "resnet18"])
def test_torchvision_equal_zennit(arch, name):
    model = getattr(torchvision.models, arch)().eval().double()
    canonizers = []
    if arch == "resnet18":
        _randomize_bn(model)
        canonizers = [ResNetCanonizer()]
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert _compare(model, x, name, canonizers) <= 1e-4


class _ConvBN(nn.Module):
    """conv (no bias) -> BN -> ReLU -> flatten -> linear -> BN1d: both fold patterns (convolution, addmm)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 5)
        self.bn1 = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn1(self.fc(torch.relu(self.bn(self.conv(x))).flatten(1)))


def test_fold_batchnorm_keeps_forward_and_follows_live_parameters():
    """The folded graph computes the model's function, with the fold computed from the live parameters."""
    model = _ConvBN().eval().double()
    _randomize_bn(model)
    with torch.no_grad():
        model.bn1.running_var.uniform_(0.5, 2.0)
        model.bn1.running_mean.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    explainer = dynlrp.compile(model, x, rules="epsilon_plus_flat", backend="eager")
    ops = [str(n.target) for n in explainer.analysed_graph.graph.nodes if n.op == "call_function"]
    assert not any("batch_norm" in op for op in ops)
    with torch.no_grad():
        assert torch.allclose(explainer(x).output, model(x), rtol=1e-10, atol=1e-12)
        model.bn.running_var.mul_(3.0)  # a live change of a folded buffer is seen at the next call
        model.bn1.weight.mul_(-2.0)
        assert torch.allclose(explainer(x).output, model(x), rtol=1e-10, atol=1e-12)
    # without the canonizer the batch norms stay in the graph
    plain = dynlrp.compile(model, x, rules=presets.epsilon_plus_flat(canonize=False), backend="eager")
    ops = [str(n.target) for n in plain.analysed_graph.graph.nodes if n.op == "call_function"]
    assert sum("batch_norm" in op for op in ops) == 2


@pytest.mark.parametrize("arch", ["conv_bn", "resnet18"])
def test_epsilon_merges_batch_norm_as_folding_does(arch):
    """The ``epsilon`` preset's ``merge_batchnorm``: LRP-0 at a convolution or linear op and its epsilon rule at the
    batch norm after it equals epsilon on the folded layer (``fold_batchnorm``, whose folding Zennit's canonizers
    match: the tests above), float64, without folding weights: the forward pass is the model's own ops, bit for bit.
    Epsilon at both ops (no merging) differs."""
    torch.manual_seed(0)
    if arch == "resnet18":
        model = torchvision.models.resnet18(num_classes=10).eval().double()
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    else:
        model = _ConvBN().eval().double()
        model.conv.bias = nn.Parameter(torch.randn(4, dtype=torch.float64))  # a producer bias is merged too
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    _randomize_bn(model)
    eps = 0.05  # large enough that one stabiliser more or less shows
    target = torch.tensor([1, 3])
    merged = dynlrp.compile(model, x, rules=presets.epsilon(eps), backend="eager")
    folded = dynlrp.compile(model, x, rules=Composite(default_class_rules(eps), canonizers=("fold_batchnorm",)),
                            backend="eager")
    unmerged = dynlrp.compile(model, x, rules=Composite(default_class_rules(eps)), backend="eager")
    rm, rf, ru = (e(x, target=target).relevance for e in (merged, folded, unmerged))
    scale = rf.abs().max().item()
    assert (rm - rf).abs().max().item() <= 1e-10 * scale
    assert (ru - rf).abs().max().item() > 1e-4 * scale
    with torch.no_grad():
        assert torch.equal(merged(x, target=target).output, model(x))
    rules = {r["rule"] for r in merged.rule_table() if r["rule_class"] == "linear"}
    assert repr(Epsilon(0.0)) in rules and repr(Epsilon(eps)) in rules


def _conv_ops(explainer) -> int:
    return sum(1 for n in explainer.graph().graph.nodes if "convolution" in str(n.target))


@pytest.mark.parametrize("name", ["epsilon_gamma_box", "epsilon_alpha2_beta1"])
def test_nonnegative_inputs_take_fast_paths(name, monkeypatch):
    """Convolutions fed by ReLU outputs are proved >= 0 and their gamma / alpha-beta rules skip the x^- terms:
    the same relevance (float64) with about half the convolutions in the relevance program."""
    from dynlrp_fx.passes import nonnegative

    model = _small_vgg11()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    fast = dynlrp.compile(model, x, rules=COMPOSITES[name][1](), backend="eager")
    fast_convs = _conv_ops(fast)  # before the patch (a cached explainer lowers its graph when first asked)
    monkeypatch.setattr(nonnegative, "nonnegative_nodes", lambda gm: set())  # no proofs: the general rules
    # the cache key cannot see a patched pass (the program of `fast` would be read back), so this one compiles anew
    slow = dynlrp.compile(model, x, rules=COMPOSITES[name][1](), backend="eager", cache=False)
    assert fast_convs < 0.6 * _conv_ops(slow)
    r_fast, r_slow = fast(x).relevance, slow(x).relevance
    assert torch.allclose(r_fast, r_slow, rtol=1e-9, atol=1e-12 * r_slow.abs().max().item())


def test_nonnegative_analysis():
    """What the analysis proves >= 0: ReLU/sigmoid/clamp(min>=0) outputs and what pooling, reshaping, sums and
    products of them give; not a difference, not an input, not a ReLU output plus an input."""
    from dynlrp_fx.passes.nonnegative import nonnegative_nodes

    class M(nn.Module):
        def forward(self, x):
            a = torch.nn.functional.max_pool2d(torch.relu(x), 2).flatten(1)
            b = torch.sigmoid(x).mean((2, 3)) * x.clamp(min=0).sum((2, 3))
            c = a.sum(1, keepdim=True) + b  # >= 0
            d = a.sum(1, keepdim=True) - b  # unknown
            e = torch.relu(x) + x  # unknown
            f = torch.relu(x) * -1.0  # <= 0
            g = torch.relu(x) + (-0.5)  # unknown
            h = torch.relu(x) * 2.0 + 0.5  # >= 0
            return c, d, e, f, g, h

    gm = torch.export.export(M(), (torch.randn(2, 3, 4, 4),)).run_decompositions().module()
    nonneg = nonnegative_nodes(gm)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert [o in nonneg for o in out] == [True, False, False, False, False, True]
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert x not in nonneg


def _marked(explainer) -> list[str]:
    """Module paths of the ops proved to receive relevance only where their output is > 0."""
    return [
        n.meta["dynlrp"].module_path for n in explainer.analysed_graph.graph.nodes
        if n.meta.get("dynlrp") is not None and n.meta["dynlrp"].extra.get("relevance_where_positive")
    ]


@pytest.mark.slow  # the default run's Zennit comparisons (VGG11, ResNet-18) go through the same fast path
def test_gamma_before_relu_takes_one_pullback(monkeypatch):
    """A gamma convolution whose output only feeds a ReLU (whose readers give relevance in proportion to it) gets
    no relevance where its output is <= 0, so u^- vanishes: one pullback instead of two, the same relevance as
    the general non-negative path (float64) and as Zennit (test_vgg11_features_equal_zennit)."""
    from dynlrp_fx.passes import nonnegative

    model = _small_vgg11()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    fast = dynlrp.compile(model, x, rules=presets.epsilon_gamma_box(LOW, HIGH), backend="eager")
    # every convolution is followed by a ReLU and marked; all but the first (z^B) are gamma
    convs = [p for p, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert set(_marked(fast)) & set(convs) == set(convs)
    fast_convs = _conv_ops(fast)
    monkeypatch.setattr(nonnegative, "relevance_only_where_positive", lambda gm: set())
    slow = dynlrp.compile(model, x, rules=presets.epsilon_gamma_box(LOW, HIGH), backend="eager", cache=False)
    assert fast_convs == _conv_ops(slow) - len(convs[1:])  # one pullback fewer per marked gamma convolution
    r_fast, r_slow = fast(x).relevance, slow(x).relevance
    assert torch.allclose(r_fast, r_slow, rtol=1e-9, atol=1e-12 * r_slow.abs().max().item())


class _ReluReaders(nn.Module):
    """conv0 -> ReLU -> conv1 -> ReLU -> {conv2 (its rule is the test's) -> ReLU -> linear; also the output}."""

    def __init__(self, out_relu: bool):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 6 * 6, 3)
        self.out_relu = out_relu

    def forward(self, x):
        a = torch.relu(self.conv1(torch.relu(self.conv0(x))))
        y = self.fc(torch.relu(self.conv2(a)).flatten(1))
        return torch.cat([y, a.flatten(1)], 1) if self.out_relu else y


@pytest.mark.parametrize("case", ["wsquare_reads", pytest.param("output_reads", marks=pytest.mark.slow)])
def test_gamma_keeps_both_pullbacks_where_relevance_may_sit_below_zero(case, monkeypatch):
    """Not proved, and so not marked: conv1's ReLU output read by a w^2 rule (relevance regardless of the input's
    value) or seeded directly as a model output (zeros included). In relevance form (the gradient form's R -> G
    conversion at a ReLU drops what reaches its zeros) the relevance is the general path's, and differs from what
    the one-pullback form gives when conv1 is marked anyway (the proof matters)."""
    from dynlrp_fx.explainer import Explainer
    from dynlrp_fx.passes import nonnegative
    from dynlrp_fx.program import Analysis
    from dynlrp_fx.rules import Gamma, Pass, WSquare, default_class_rules

    torch.manual_seed(0)
    model = _ReluReaders(out_relu=case == "output_reads").double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    by_path = {"conv0": Gamma(0.25), "conv1": Gamma(0.25), "conv2": WSquare() if case == "wsquare_reads" else Gamma(0.25)}
    seed = torch.zeros(2, 3 + 6 * 6 * 6 if case == "output_reads" else 3, dtype=torch.float64)
    seed[:, 1] = 1.0
    if case == "output_reads":
        seed[:, 3:] = -1.0  # relevance seeded at ReLU outputs, also where they are zero
    # Pass on the ReLUs, as Zennit's composites: relevance reaching a ReLU output where it is zero goes on to z <= 0
    rules = dynlrp.Composite(class_rules={**default_class_rules(), "identity": Pass()}, by_path=by_path)
    traced = dynlrp.compile(model, x, rules=rules, backend="eager").traced

    def relevance(proof=None):
        with monkeypatch.context() as m:
            if proof is not None:
                m.setattr(nonnegative, "relevance_only_where_positive", proof)
            ex = Explainer(model, traced, rules, analysis=Analysis(traced, rules, gradient_form=False))
            return ex(x, seed=seed).relevance, _marked(ex)

    r, marked = relevance()
    assert "conv0" in marked and "conv1" not in marked
    assert torch.allclose(r, relevance(lambda gm: set())[0], rtol=1e-9, atol=1e-12)
    # marking conv1 anyway drops relevance the general rule keeps
    forced, _ = relevance(
        lambda gm: {n for n in gm.graph.nodes if n.op == "call_function" and n.meta.get("dynlrp") is not None
                    and n.meta["dynlrp"].module_path in ("conv0", "conv1") and "convolution" in str(n.target)},
    )
    assert not torch.allclose(r, forced, rtol=1e-6, atol=1e-9)
