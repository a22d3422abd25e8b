"""Issue 3: rule assignment precedence, the rule table, presets by name, and the gradient baseline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynlrp_fx as dynlrp
from dynlrp_fx import presets
from dynlrp_fx.rules import Composite, Epsilon, Flat, Gamma, NodeInfo, Pass, ZPlus
from tests.helpers import grad_x_input

aten = torch.ops.aten
D = torch.float64


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1))
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = h + self.block(h)
        return self.fc(F.avg_pool2d(h, 2).flatten(1))


def _rules_by_module(explainer, op="aten.convolution.default"):
    return {r["module"]: r["rule"] for r in explainer.rule_table() if r["op"] == op}


def test_precedence_path_beats_type_beats_op():
    comp = Composite(
        by_op={"aten.convolution.default": Epsilon(0.5)},
        by_module_type={nn.Conv2d: Gamma(0.1)},
        by_path={"block.2": ZPlus()},
        name="t",
    )
    m = Net().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=D)
    with pytest.warns(UserWarning, match=r"by_op\['aten.convolution.default'\].* chose the rule of no node"):
        ex = dynlrp.compile(m, x, rules=comp, backend="eager")  # the op entry is shadowed everywhere: reported
    rules = _rules_by_module(ex)
    assert rules["block.2"] == repr(ZPlus())  # path glob wins
    assert rules["block.0"] == repr(Gamma(0.1)) and rules["stem"] == repr(Gamma(0.1))  # then module type
    by_op_only = Composite(by_op={aten.convolution.default: Epsilon(0.5)})
    rules = _rules_by_module(dynlrp.compile(m, x, rules=by_op_only, backend="eager"))
    assert set(rules.values()) == {repr(Epsilon(0.5))}  # op beats the class default
    # a rule only applies to nodes of a class it fits: Gamma on nn.Sequential leaves ReLU with Identity
    ex = dynlrp.compile(m, x, rules=Composite(by_path={"block*": Gamma(0.3)}), backend="eager")
    block_rows = [r for r in ex.rule_table() if r["module"].startswith("block") and r["rule"]]
    assert {r["rule"] for r in block_rows if r["rule_class"] == "linear"} == {repr(Gamma(0.3))}
    assert {r["rule"] for r in block_rows if r["rule_class"] == "identity"} == {"Identity()"}


def test_rule_for_precedence_unit():
    comp = Composite(
        by_op={aten.convolution.default: Epsilon(0.5)},
        by_module_type={nn.Conv2d: Gamma(0.1)},
        by_path={"a.*": ZPlus()},
        first_layer=Flat(),
        first_layer_types=(nn.Conv2d,),
    )
    conv = aten.convolution.default
    assert comp.rule_for(NodeInfo("n", conv, "linear", "a.b", (Net, nn.Conv2d), first_layer=True)) == ZPlus()
    assert comp.rule_for(NodeInfo("n", conv, "linear", "x", (Net, nn.Conv2d), first_layer=True)) == Flat()
    # first layer restricted to Conv2d: a first nn.Linear gets its module-type/op rule instead
    assert comp.rule_for(NodeInfo("n", conv, "linear", "x", (Net, nn.Linear), first_layer=True)) == Epsilon(0.5)
    assert comp.rule_for(NodeInfo("n", conv, "linear", "x", (Net, nn.Conv2d))) == Gamma(0.1)
    assert comp.rule_for(NodeInfo("n", aten.mm.default, "linear", "x", (Net,))) == Epsilon(1e-6)
    with pytest.raises(ValueError, match="unknown canonizers"):
        Composite(canonizers=("merge_everything",))


def test_rule_table_lists_every_op_node():
    m = Net().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=D)
    ex = dynlrp.compile(m, x, rules="epsilon_gamma_box", backend="eager")
    table = ex.rule_table()
    gm = ex.analysed_graph
    relevant = [n.name for n in gm.graph.nodes if n.op == "call_function" and n.meta.get("dynlrp") is not None]
    assert [r["node"] for r in table] == relevant
    for r in table:
        assert {"module", "op", "rule"} <= set(r)
        if r["relevant"] and r["op"] != "<built-in function getitem>":
            assert r["rule"] is not None, r
    convs = _rules_by_module(ex)
    assert convs["stem"].startswith("ZBox")  # first layer
    assert convs["block.0"] == repr(Gamma(0.25)) == convs["block.2"]
    assert [r["rule"] for r in table if r["module"] == "fc" and r["rule_class"] == "linear"] == [repr(Epsilon(1e-6))]


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_presets_by_name(name):
    comp = presets.resolve(name)
    assert isinstance(comp, Composite) and comp.name == name
    zennit_like = name.startswith("epsilon_")
    assert ("fold_batchnorm" in comp.canonizers) == zennit_like
    # attnlrp is epsilon(0) (nothing to merge at eps = 0; its epsilon variant merges as epsilon does)
    assert ("merge_batchnorm" in comp.canonizers) == (name in ("epsilon", "attnlrp"))
    if zennit_like:
        assert comp.by_module_type[nn.Linear] == Epsilon(1e-6)
        assert comp.by_module_type[nn.BatchNorm2d] == Pass()
    with pytest.raises(ValueError, match="unknown rules preset"):
        presets.resolve("epsilon_gama_box")


class Smooth(nn.Module):
    """Nonlinear, not piecewise linear: GELU, LayerNorm, softmax, a gate and a residual."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.ln = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.ln(F.gelu(self.fc1(x)))
        h = h + torch.sigmoid(self.fc2(h)) * h
        return self.out(torch.softmax(h, -1) * h)


def test_gradient_preset_equals_gradient_times_input():
    m = Smooth().double().eval()
    x = torch.randn(4, 6, dtype=D)
    ex = dynlrp.compile(m, x, rules="gradient", backend="eager")
    target = torch.tensor([0, 1, 2, 1])
    e = ex(x, target=target)
    ref = grad_x_input(m, x, target)
    assert torch.allclose(e.relevance, ref, atol=1e-12, rtol=1e-9)
