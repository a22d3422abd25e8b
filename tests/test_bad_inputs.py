"""Bad inputs at call time and bad rule configurations: each case gives a ``Dynlrp*`` error (or ``ValueError`` for a
malformed rule object) whose message names the problem, or a correct result; the model, its parameters and torch's
global state are unchanged afterwards."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import dynlrp_fx as dynlrp
from dynlrp_fx.rules import Composite, Epsilon, Gamma


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).eval()


@pytest.fixture
def mlp():
    model = _mlp()
    x = torch.randn(4, 6)
    return model, x, dynlrp.compile(model, x, rules="lrp0", backend="eager")


def _global_state():
    return (torch.is_grad_enabled(), torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled())


CALL_CASES = [
    # (name, call kwargs built from x, expected message fragment)
    ("seed (4, 5)", lambda x: {"seed": torch.ones(4, 5)}, "seed= has shape (4, 5)"),
    ("seed (4,)", lambda x: {"seed": torch.ones(4)}, "seed= has shape (4,)"),
    ("seed (1, 4)", lambda x: {"seed": torch.ones(1, 4)}, "seed= has shape (1, 4)"),
    ("int seed", lambda x: {"seed": torch.ones(4, 4, dtype=torch.long)}, "floating tensor"),
    ("list seed", lambda x: {"seed": [[1.0] * 4] * 4}, "must be a tensor"),
    ("float targets", lambda x: {"target": [1.7, 0.2, 0.0, 1.0]}, "integer indices"),
    ("float target", lambda x: {"target": 2.9}, "integer indices"),
    ("bool target", lambda x: {"target": True}, "integer indices"),
    ("string target", lambda x: {"target": "cat"}, "not an index"),
    ("target and seed", lambda x: {"target": 1, "seed": torch.ones(4, 4)}, "not both"),
    ("target out of range", lambda x: {"target": 4}, "out of range"),
    ("per-sample target count", lambda x: {"target": [0, 1]}, "2 entries but the batch has 4"),
]


@pytest.mark.parametrize("name,kwargs,needle", CALL_CASES, ids=[c[0] for c in CALL_CASES])
def test_bad_targets_and_seeds_raise_clear_errors(mlp, name, kwargs, needle):
    model, x, ex = mlp
    before = copy.deepcopy(model.state_dict())
    state = _global_state()
    with pytest.raises(dynlrp.DynlrpInputError) as info:
        ex(x, **kwargs(x))
    assert needle in str(info.value), str(info.value)
    assert _global_state() == state
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    # the explainer still works after the error, and a valid seed of the output's shape is accepted
    e = ex(x, seed=torch.ones(4, 4))
    assert e.relevance.shape == x.shape


def test_bad_inputs_raise_clear_errors(mlp):
    model, x, ex = mlp
    cases = [
        (torch.empty(0, 6), "empty batch"),
        (torch.empty(4, 6, device="meta"), "meta device"),
        (torch.randn(4, 7), "dimension 1 must be 6"),
        (torch.randn(4, 6, dtype=torch.float64), "dtype torch.float64"),
        (torch.randn(4, 6, 1), "3 dimensions"),
    ]
    for bad, needle in cases:
        with pytest.raises(dynlrp.DynlrpInputError) as info:
            ex(bad)
        assert needle in str(info.value), str(info.value)


def test_a_model_changed_after_compile_is_refused_not_mis_run():
    model = _mlp()
    x = torch.randn(4, 6)
    ex = dynlrp.compile(model, x, rules="lrp0", backend="eager")
    ref = ex(x).relevance
    model.double()  # another dtype after compile
    with pytest.raises(dynlrp.DynlrpInputError, match=r"now torch.float64 .* compile it again"):
        ex(x)
    model.float()
    torch.testing.assert_close(ex(x).relevance, ref)  # back as compiled: the same explanation
    model[2] = nn.Linear(8, 5)  # a replaced layer of another shape
    with pytest.raises(dynlrp.DynlrpInputError, match=r"'2.weight' .* \(5, 8\) .* \(4, 8\)"):
        ex(x)


def test_the_explainer_reads_the_live_weights_of_the_model():
    """Weights are read at every call (through the modules' own registries): an in-place update, a replaced
    ``nn.Parameter`` and a replaced layer of the same shape all give what a fresh compile gives; a removed layer
    is refused with its name."""
    model = _mlp()
    x = torch.randn(4, 6)
    ex = dynlrp.compile(model, x, rules="lrp0", backend="eager")

    def fresh():
        return dynlrp.compile(model, x, rules="lrp0", backend="eager")(x).relevance

    before = ex(x).relevance
    with torch.no_grad():
        model[0].weight.mul_(-2.0)
    torch.testing.assert_close(ex(x).relevance, fresh())
    assert not torch.allclose(ex(x).relevance, before)
    model[2].bias = nn.Parameter(torch.randn(4))
    torch.testing.assert_close(ex(x).relevance, fresh())
    model[2] = nn.Linear(8, 4)
    torch.testing.assert_close(ex(x).relevance, fresh())
    del model[2]
    with pytest.raises(dynlrp.DynlrpInputError, match=r"no longer has the parameter '2.weight'"):
        ex(x)


def test_malformed_rules_are_rejected_at_construction():
    for make, needle in [
        (lambda: Epsilon(float("nan")), "finite number >= 0"),
        (lambda: Epsilon(-1e-3), "finite number >= 0"),
        (lambda: Gamma(-0.5), "gamma must be a finite number >= 0"),
        (lambda: Gamma(0.25, float("inf")), "stabilizer"),
        (lambda: Composite({"linaer": Epsilon()}), "unknown rule classes ['linaer']"),
        (lambda: Composite(by_op={"aten.convolutoin.default": Gamma()}), "no ATen op"),
        (lambda: Composite(by_module_type={"Conv2d": Gamma()}), "not an nn.Module subclass"),
        (lambda: Composite(by_path={"0": 0.25}), "not a dynlrp_fx.rules.Rule"),
    ]:
        with pytest.raises(ValueError) as info:
            make()
        assert needle in str(info.value), str(info.value)


def test_composite_entries_that_match_nothing_are_reported():
    model = _mlp()
    x = torch.randn(4, 6)
    # a path glob with a typo matches no module: an error naming the glob and the real paths
    with pytest.raises(dynlrp.DynlrpInputError, match=r"by_path '3' matches no module .* 0, 1, 2"):
        dynlrp.compile(model, x, rules=Composite(by_path={"3": Epsilon(0.1)}), backend="eager")
    # an entry that matches modules or ops but chooses no rule warns
    with pytest.warns(UserWarning, match=r"by_module_type\[<class 'torch.nn.modules.conv.Conv2d'>\]"):
        dynlrp.compile(model, x, rules=Composite(by_module_type={nn.Conv2d: Gamma()}), backend="eager")
    # entries that apply: no warning, and the rule is used
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ex = dynlrp.compile(model, x, rules=Composite(by_path={"2": Epsilon(0.5)}), backend="eager")
    rules = {r["module"]: r["rule"] for r in ex.rule_table() if r["op"] == "aten.addmm.default"}
    assert rules["2"] == "Epsilon(epsilon=0.5)" and rules["0"] == "Epsilon(epsilon=1e-06)"
    # the presets are written for any model: a CNN preset on an MLP is fine
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dynlrp.compile(model, x, rules="epsilon_gamma_box", backend="eager")
