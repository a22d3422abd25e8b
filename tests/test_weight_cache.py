"""The weight cache (dynlrp_fx.weight_cache): what a program computes from the weights alone is computed once, and
again after any change to a parameter or buffer; the relevance equals the uncached program's at every step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
from torch import nn

import dynlrp_fx as dynlrp
from dynlrp_fx.weight_cache import WeightCache, split_state


class _Residual(nn.Module):
    """conv-BN-ReLU, conv-BN plus a skip, ReLU, pool, linear: batch-norm folds and gamma's modified weights."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn0(self.stem(x)))
        h = torch.relu(h + self.bn1(self.conv(h)))
        return self.head(h.mean((2, 3)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = _Residual().double()
    with torch.no_grad():  # batch-norm statistics away from the identity, so that the folds matter
        for bn in (m.bn0, m.bn1):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(-1.5, 1.5)  # negative scales too: the fold flips W's signs
    return m.eval()


def _x(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _reference(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """The relevance of an explainer that computes everything at every call."""
    ex = dynlrp.compile(model, x, rules="epsilon_gamma_box", backend="eager", cache=False, cache_weights=False)
    return ex(x, target=target).relevance


def _runner(ex) -> WeightCache:
    run = ex._runners["target"][1]
    assert isinstance(run, WeightCache)
    return run


def test_weights_cached_once_and_equal_to_the_uncached_program():
    model, x = _model(), _x()
    ex = dynlrp.compile(model, x, rules="epsilon_gamma_box", backend="eager", cache=False)
    ref = _reference(model, x, 2)
    for _ in range(3):
        assert torch.equal(ex(x, target=2).relevance, ref)
    run = _runner(ex)
    assert run.prologue_runs == 1
    assert run.split.hoisted > 10  # two batch-norm folds and the gamma weights of two convolutions
    assert ex.weight_cache_bytes > 0
    # nothing cached with cache_weights=False, and the same relevance
    off = ex.recompile(cache_weights=False)
    assert torch.equal(off(x, target=2).relevance, ref)
    assert off.weight_cache_bytes == 0 and not isinstance(off._runners["target"][1], WeightCache)


@pytest.mark.parametrize("change", ["in_place", "optimiser_step", "load_state_dict", "replaced_parameter",
                                    "batch_norm_buffer"])
def test_a_weight_change_is_seen_at_the_next_call(change):
    model, x = _model(), _x()
    ex = dynlrp.compile(model, x, rules="epsilon_gamma_box", backend="eager", cache=False)
    before = ex(x, target=1).relevance
    other = _model()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-0.7).add_(0.1)
    if change == "in_place":
        with torch.no_grad():
            model.conv.weight.mul_(2.0)
    elif change == "optimiser_step":
        model.stem.weight.requires_grad_(True)
        opt = torch.optim.SGD([model.stem.weight], lr=0.5)
        model(x).sum().backward()
        opt.step()
    elif change == "load_state_dict":
        model.load_state_dict(other.state_dict())
    elif change == "replaced_parameter":
        model.conv.weight = nn.Parameter(other.conv.weight.detach().clone())
    else:
        with torch.no_grad():
            model.bn1.running_var.mul_(3.0)
    after = ex(x, target=1).relevance
    ref = _reference(model, x, 1)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, ref, rtol=1e-10, atol=1e-12)
    assert _runner(ex).prologue_runs == 2
    assert torch.equal(ex(x, target=1).relevance, after) and _runner(ex).prologue_runs == 2


def test_model_untouched_and_explanation_owns_its_tensors():
    model, x = _model(), _x()
    state = copy.deepcopy(model.state_dict())
    ex = dynlrp.compile(model, x, rules="epsilon_gamma_box", backend="eager", cache=False)
    e1 = ex(x, target=0)
    kept = e1.relevance.clone()
    ex(2 * x, target=3)
    assert torch.equal(e1.relevance, kept)  # a later call writes nothing an earlier explanation holds
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def _graph(build) -> fx.GraphModule:
    g = fx.Graph()
    build(g)
    return fx.GraphModule(nn.Module(), g)


def test_split_keeps_a_buffer_read_before_its_last_write_in_the_main_program():
    # a = w + 1 (state only) is read by the main program, then written in place (a *= 2) by a state-only op:
    # moving both to the prologue would make the main program read the written value
    aten = torch.ops.aten

    def build(g):
        w, x = g.placeholder("w"), g.placeholder("x")
        a = g.call_function(aten.add.Tensor, (w, 1.0))
        m = g.call_function(aten.mul.Tensor, (x, a))
        a2 = g.call_function(aten.mul_.Tensor, (a, 2.0))
        b = g.call_function(aten.mul.Tensor, (w, 3.0))
        y = g.call_function(aten.mul.Tensor, (x, a2))
        g.output((m, g.call_function(aten.add.Tensor, (y, b))))

    gm = _graph(build)
    split = split_state(gm, 1)
    assert split is not None and split.hoisted == 1  # only b = w * 3
    w, x = torch.randn(4), torch.randn(4)
    run = WeightCache(split, split.main)
    for _ in range(2):
        got = run(w, x)
        want = gm(w, x)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_split_leaves_views_and_returned_values_in_the_main_program():
    aten = torch.ops.aten

    def build(g):
        w, x = g.placeholder("w"), g.placeholder("x")
        wt = g.call_function(aten.t.default, (w,))  # a view of state: free, nothing to cache
        s = g.call_function(aten.mul.Tensor, (w, 2.0))  # returned: must not be a cached tensor
        y = g.call_function(aten.mm.default, (x, wt))
        g.output((y, s))

    assert split_state(_graph(build), 1) is None


def test_main_program_never_writes_a_cached_value():
    """After the eager backend's buffer reuse, no op of the main program writes into a cached value."""
    model, x = _model(), _x()
    ex = dynlrp.compile(model, x, rules="epsilon_gamma_box", backend="eager", cache=False)
    ex(x, target=0)
    main = _runner(ex).split.main
    cached = {n for n in main.graph.nodes if n.op == "placeholder" and n.name.startswith("cached_")}
    assert cached
    for n in main.graph.nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
            for i, a in enumerate(n.target._schema.arguments):
                v = n.args[i] if i < len(n.args) and not a.kwarg_only else n.kwargs.get(a.name)
                if a.alias_info is not None and a.alias_info.is_write:
                    assert v not in cached, n.format_node()


def test_several_targets_cache_the_forward_half():
    """With ``K`` targets per sample the forward half of the split program reads the cached values too: the result
    equals the uncached explainer's and ``K`` single calls, and the prologue runs once over several calls."""
    model, x = _model(), _x(2)
    ex = dynlrp.compile(model, x, rules="epsilon_gamma_box", backend="eager", cache=False)
    off = ex.recompile(cache_weights=False)
    t = torch.tensor([[0, 3, 1], [2, 2, 0]])
    for _ in range(2):
        got = ex(x, target=t).relevance
    torch.testing.assert_close(got, off(x, target=t).relevance, rtol=1e-12, atol=1e-14)
    for j in range(t.shape[1]):
        torch.testing.assert_close(got[:, j], off(x, target=t[:, j]).relevance, rtol=1e-10, atol=1e-12)
    fwd = ex.split("target").forward
    assert isinstance(fwd, WeightCache) and fwd.prologue_runs == 1
    assert not isinstance(off.split("target").forward, WeightCache)
    with torch.no_grad():
        model.conv.weight.mul_(-1.5)
    torch.testing.assert_close(ex(x, target=t).relevance, off(x, target=t).relevance, rtol=1e-12, atol=1e-14)
    assert fwd.prologue_runs == 2
