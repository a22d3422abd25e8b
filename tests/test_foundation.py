"""Issue 2 acceptance: LRP-0 == gradient x input, conservation, targets, model untouched, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

import dynlrp_fx as dynlrp
from tests.helpers import grad_x_input


class Block(nn.Module):
    """conv-BN-ReLU with an optional residual add or channel concat."""

    def __init__(self, c: int, kind: str, bias: bool, pool: str):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(c, affine=bias)
        self.conv2 = nn.Conv2d(2 * c if kind == "cat" else c, c, 1, bias=bias)
        self.pool = {"max": nn.MaxPool2d(2), "avg": nn.AvgPool2d(2), "none": nn.Identity()}[pool]

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        if self.kind == "res":
            h = h + x
        elif self.kind == "cat":
            h = torch.cat([h, x], 1)
        return self.pool(self.conv2(h))


class Net(nn.Module):
    def __init__(self, c: int, kinds: list, pools: list, hidden: int, bias: bool, hw: int):
        super().__init__()
        self.stem = nn.Conv2d(2, c, 3, padding=1, bias=bias)
        self.blocks = nn.Sequential(*[Block(c, k, bias, p) for k, p in zip(kinds, pools)])
        for p in pools:
            if p != "none":
                hw //= 2
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * hw * hw, hidden, bias=bias), nn.ReLU(), nn.Linear(hidden, 4, bias=bias))

    def forward(self, x):
        return self.head(self.blocks(torch.relu(self.stem(x))))


def _randomize_bn(model: nn.Module, g: torch.Generator, bias: bool) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            if bias:  # a running mean shifts like a bias; bias-free nets keep it at 0
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=m.running_mean.dtype) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=m.running_var.dtype) + 0.5)


net_specs = st.fixed_dictionaries(
    {
        "c": st.integers(2, 4),
        "kinds": st.lists(st.sampled_from(["plain", "res", "cat"]), min_size=1, max_size=3),
        "pool": st.lists(st.sampled_from(["max", "avg", "none"]), min_size=3, max_size=3),
        "hidden": st.integers(3, 8),
        "seed": st.integers(0, 10_000),
        "batch": st.integers(2, 3),
    }
)


def _build(spec, bias=True):
    g = torch.Generator().manual_seed(spec["seed"])
    torch.manual_seed(spec["seed"])
    kinds = spec["kinds"]
    pools = spec["pool"][: len(kinds)]
    net = Net(spec["c"], kinds, pools, spec["hidden"], bias, 8).double().eval()
    _randomize_bn(net, g, bias)
    x = torch.randn(spec["batch"], 2, 8, 8, generator=g, dtype=torch.float64)
    return net, x


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], phases=[Phase.explicit, Phase.generate])
@given(spec=net_specs, target=st.integers(0, 3))
def test_lrp0_equals_gradient_times_input(spec, target):
    net, x = _build(spec, bias=True)
    explainer = dynlrp.compile(net, x, rules="lrp0", backend="eager")
    expl = explainer(x, target=target)
    ref = grad_x_input(net, x, target)
    assert expl.relevance.shape == x.shape
    assert (expl.relevance - ref).abs().max().item() <= 1e-6
    assert torch.allclose(expl.output, net(x))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow], phases=[Phase.explicit, Phase.generate])
@given(spec=net_specs)
def test_conservation_bias_free_lrp0(spec):
    net, x = _build(spec, bias=False)
    expl = dynlrp.compile(net, x, rules="lrp0", backend="eager")(x)
    seed = expl.conservation.seed
    total = expl.relevance.flatten(1).sum(1)
    assert torch.all((total - seed).abs() <= 1e-9 * seed.abs().clamp_min(1e-12))
    assert expl.absorbed.abs().max() <= 1e-9 * seed.abs().max()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow], phases=[Phase.explicit, Phase.generate])
@given(spec=net_specs)
def test_conservation_ledger_with_biases_epsilon(spec):
    net, x = _build(spec, bias=True)
    expl = dynlrp.compile(net, x, rules="epsilon", backend="eager")(x)
    c = expl.conservation
    assert torch.allclose(c.inputs, expl.relevance.flatten(1).sum(1))
    assert torch.all((c.seed - c.inputs - c.absorbed).abs() <= 1e-6 * c.seed.abs().clamp_min(1.0))
    assert c.absorbed.abs().max() > 0  # biases do absorb relevance


def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double().eval()


def test_target_modes_and_seed():
    model = _mlp()
    x = torch.randn(4, 5, dtype=torch.float64)
    ex = dynlrp.compile(model, x, rules="lrp0", backend="eager")
    y = model(x)
    # default: argmax per sample, seed = logit value -> relevance sums to the logit
    e = ex(x)
    assert torch.allclose(e.conservation.seed, y.max(1).values)
    # one int for all samples, and one index per sample
    e1 = ex(x, target=2)
    assert torch.allclose(e1.conservation.seed, y[:, 2])
    per = [0, 1, 2, 0]
    e2 = ex(x, target=per)
    assert torch.allclose(e2.conservation.seed, y[torch.arange(4), torch.tensor(per)])
    assert torch.allclose(e2.relevance, grad_x_input(model, x, torch.tensor(per)), atol=1e-10)
    # explicit seed used as is: one-hot seed gives gradient x input / z scaling (Zennit's default)
    onehot = torch.zeros_like(y)
    onehot[:, 1] = 1.0
    e3 = ex(x, seed=onehot)
    assert torch.allclose(e3.conservation.seed, torch.ones(4, dtype=torch.float64))
    # LRP-0 is linear in the seed: seed = y*onehot gives the target=1 explanation
    e4 = ex(x, seed=onehot * y)
    assert torch.allclose(e4.relevance, ex(x, target=1).relevance, atol=1e-12)


def test_dynamic_batch_eager_graph_is_batch_generic():
    model = _mlp()
    ex = dynlrp.compile(model, torch.randn(2, 5, dtype=torch.float64), rules="lrp0", backend="eager")
    for b in (1, 3, 7):
        x = torch.randn(b, 5, dtype=torch.float64)
        assert torch.allclose(ex(x, target=0).relevance, grad_x_input(model, x, 0), atol=1e-10)


class _BoundedBatch(nn.Module):
    """An op that bounds the batch, as cuDNN batch norm does on CUDA (batch <= 65535)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        torch._check(x.shape[0] <= 100)
        return self.fc(x).relu()


def test_a_batch_bound_from_the_model_is_traced_and_enforced():
    model = _BoundedBatch().double()
    ex = dynlrp.compile(model, torch.randn(2, 5, dtype=torch.float64), rules="lrp0", backend="eager")
    assert ex.traced.max_batch == 100
    for b in (1, 100):
        x = torch.randn(b, 5, dtype=torch.float64)
        assert torch.allclose(ex(x, target=0).relevance, grad_x_input(model, x, 0), atol=1e-10)
    with pytest.raises(dynlrp.DynlrpInputError, match="bound the batch to 100"):
        ex(torch.randn(101, 5, dtype=torch.float64))


def test_input_errors():
    model = _mlp()
    ex = dynlrp.compile(model, torch.randn(2, 5, dtype=torch.float64), backend="eager")
    with pytest.raises(dynlrp.DynlrpInputError, match="dimensions"):
        ex(torch.randn(2, 5, 1, dtype=torch.float64))
    with pytest.raises(dynlrp.DynlrpInputError, match="dtype"):
        ex(torch.randn(2, 5))
    with pytest.raises(dynlrp.DynlrpInputError, match="shape"):
        ex(torch.randn(2, 6, dtype=torch.float64))
    with pytest.raises(dynlrp.DynlrpInputError, match="out of range"):
        ex(torch.randn(2, 5, dtype=torch.float64), target=3)
    with pytest.raises(dynlrp.DynlrpInputError, match="structure"):
        ex(torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64))


def test_model_untouched():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(2, 3, 6, 6)
    model(x)
    model.train()  # a model in training mode: explained in eval mode, flag restored
    before = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    ex = dynlrp.compile(model, x, backend="eager")
    ex(x)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert [m.training for m in model.modules()] == flags
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        assert not getattr(m, "_backward_pre_hooks", None)
    assert all(p.grad is None for p in model.parameters())
    # the explainer does not own the model: moving/eval-ing it leaves the model alone
    ex.eval()
    assert model.training


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return -self.lin(x)


def test_trace_error_names_the_line():
    with pytest.raises(dynlrp.DynlrpTraceError) as info:
        dynlrp.compile(Branchy(), torch.randn(2, 4), backend="eager")
    msg = str(info.value)
    assert "if x.sum() > 0:" in msg
    assert "test_foundation.py" in msg


_lib = torch.library.Library("dynlrp_test", "DEF")
_lib.define("wiggle(Tensor x) -> Tensor")


@torch.library.impl(_lib, "wiggle", "CompositeExplicitAutograd")
def _wiggle(x):
    return x * torch.sigmoid(x)


@torch.library.register_fake("dynlrp_test::wiggle")
def _wiggle_fake(x):
    return torch.empty_like(x)


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.ops.dynlrp_test.wiggle(self.inner(x)))


def test_unsupported_op_error_names_op_and_module():
    with pytest.raises(dynlrp.DynlrpUnsupportedOpError) as info:
        dynlrp.compile(Custom(), torch.randn(2, 4), backend="eager")
    msg = str(info.value)
    assert "dynlrp_test.wiggle" in msg
    assert "register_op" in msg
    assert any("dynlrp_test.wiggle" in k for k in info.value.uncovered)


def test_register_op_makes_custom_op_explainable():
    from dynlrp_fx.rules.table import OP_TABLE

    op = torch.ops.dynlrp_test.wiggle.default
    try:
        dynlrp.register_op(op, "unary")
        model = Custom().double()
        x = torch.randn(3, 4, dtype=torch.float64)
        e = dynlrp.compile(model, x, rules="lrp0", backend="eager")(x, target=1)
        # identity through the activation, LRP-0 elsewhere: conservation up to biases (ledger closes)
        c = e.conservation
        assert torch.allclose(c.seed, c.inputs + c.absorbed, atol=1e-10)
    finally:
        OP_TABLE.pop(op, None)


class _KeylessOutput(dict):
    """An output container registered as a pytree node without key paths (as transformers < 5 registers
    ``ModelOutput``)."""


torch.utils._pytree.register_pytree_node(
    _KeylessOutput,
    lambda d: (list(d.values()), list(d.keys())),
    lambda values, keys: _KeylessOutput(zip(keys, values)),
)


def test_output_names_without_key_paths():
    """Output naming (``output="logits"``) works for pytree nodes that lack key paths."""
    from dynlrp_fx.trace import _output_names

    _, spec = torch.utils._pytree.tree_flatten(_KeylessOutput(logits=torch.zeros(1), hidden=(torch.zeros(1),) * 2))
    with pytest.raises(ValueError):  # the path torch offers fails for such nodes ...
        torch.utils._pytree.tree_flatten_with_path(_KeylessOutput(a=1))
    assert _output_names(spec, 3) == ["['logits']", "['hidden'][0]", "['hidden'][1]"]  # ... ours does not
