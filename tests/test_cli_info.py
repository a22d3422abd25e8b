"""``dynlrp.rules.describe_op`` and ``dynlrp info [--op OP [--rules NAME]]``; the CLI package layout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynlrp_fx.cli import build_parser, main
from dynlrp_fx.presets import resolve
from dynlrp_fx.rules import OpDescription, describe_op
from dynlrp_fx.rules.describe import resolve_op

ROOT = Path(__file__).resolve().parents[1]
aten = torch.ops.aten


def _classes(d: OpDescription) -> dict:
    """rule class -> RuleClassInfo of a description with one entry."""
    (entry,) = d.entries
    return {c.rule_class: c for c in entry.rule_classes}


# -- describe_op ----------------------------------------------------------------------------------------------------
def test_bmm_is_multilinear_linear_or_bilinear_with_the_epsilon_rules():
    d = describe_op("aten.bmm")
    assert d.packet and d.name == "aten.bmm"
    assert {o for e in d.entries for o in e.overloads} == {getattr(aten.bmm, o) for o in aten.bmm.overloads()}
    (entry,) = d.entries
    assert entry.spec.kind == "multilinear" and entry.spec.factors == (0, 1)
    assert d.rule_classes == ("linear", "bilinear")
    eps = resolve(None)
    for name, c in _classes(d).items():
        (p,) = c.rules
        assert p.preset == "epsilon" and p.rule == eps.class_rules[name] and p.overrides == ()
    text = str(d)
    assert "kind=multilinear" in text and "factors=(0: self, 1: mat2)" in text
    assert "bilinear: two or more factors carry data" in text
    assert f"epsilon (default): {eps.class_rules['bilinear']!r}" in text
    for fact in (
        "bias=None",
        "cheap=False",
        "recompute_cost=1",
        "nonneg=None",
        "reduction=False",
        "scale=False",
        "activation=False",
        "reshape=False",
        "aliases=False",
    ):
        assert fact in text


def test_op_spellings_resolve_to_the_same_op():
    packet = str(describe_op("aten.bmm"))
    for spelling in (aten.bmm, "torch.ops.aten.bmm", "aten::bmm", "bmm"):
        assert str(describe_op(spelling)) == packet
    default = str(describe_op("aten.bmm.default"))
    assert default.splitlines()[0] == "aten.bmm.default"
    for spelling in (aten.bmm.default, "torch.ops.aten.bmm.default", "aten::bmm.default", "bmm.default"):
        assert str(describe_op(spelling)) == default
    assert resolve_op("aten.bmm.default") == ("aten.bmm.default", [aten.bmm.default])


def test_named_preset_lists_its_class_rule_and_by_op_override():
    d = describe_op(aten.bmm.default, rules="dynamiclrp")
    dyn = resolve("dynamiclrp")
    classes = _classes(d)
    default, named = classes["linear"].rules
    assert default.preset == "epsilon" and named.preset == "dynamiclrp"
    assert named.rule == dyn.class_rules["linear"]
    assert named.overrides == (("by_op aten.bmm.default", dyn.by_op[aten.bmm.default]),)
    _, named_bilinear = classes["bilinear"].rules
    assert named_bilinear.rule == dyn.class_rules["bilinear"] and named_bilinear.overrides == ()  # Gamma: linear only
    text = str(d)
    assert f"dynamiclrp: {dyn.class_rules['linear']!r}" in text
    assert f"by_op aten.bmm.default: {dyn.by_op[aten.bmm.default]!r}" in text
    assert len(_classes(describe_op("aten.bmm.default", rules="epsilon"))["linear"].rules) == 1  # not twice


def test_module_type_and_first_layer_overrides():
    box = resolve("epsilon_gamma_box")
    (linear_default, named) = _classes(describe_op("aten.convolution.default", rules="epsilon_gamma_box"))[
        "linear"
    ].rules
    wheres = [w for w, _ in named.overrides]
    assert wheres[0].startswith("first_layer inside Conv1d, Conv2d") and repr(named.overrides[0][1]) == repr(
        box.first_layer
    )
    assert any(
        w.startswith("by_module_type Conv1d") and r == box.by_module_type[torch.nn.Conv2d] for w, r in named.overrides
    )
    assert linear_default.overrides == ()
    # only multilinear ops can be a first layer
    (_, relu_named) = _classes(describe_op("aten.relu.default", rules="epsilon_gamma_box"))["identity"].rules
    assert not any(w.startswith("first_layer") for w, _ in relu_named.overrides)


def test_relu_is_nonneg_always():
    d = describe_op("aten.relu.default")
    (entry,) = d.entries
    assert entry.spec.kind == "unary" and entry.spec.nonneg == "always"
    assert d.rule_classes == ("identity",)
    assert "nonneg='always'" in str(d)


def test_mul_and_div_classes_follow_classify():
    assert describe_op("aten.mul.Tensor").rule_classes == ("linear", "product", "normalizer")
    assert describe_op("aten.div.Tensor").rule_classes == ("linear", "div", "normalizer")
    assert describe_op("aten.mul.Scalar").rule_classes == ("linear",)
    assert describe_op("aten.index_put.default").rule_classes == ("route", "linear")  # accumulate=True


def test_layer_norm_entry():
    d = describe_op("aten.native_layer_norm.default")
    (entry,) = d.entries
    assert entry.spec.kind == "layernorm" and entry.spec.bias == 3
    text = str(d)
    for part in (
        "kind=layernorm",
        "slots=(0: input)",
        "bias=3 (bias)",
        "cheap=True",
        "recompute_cost=4",
        "reduction=True",
        "scale=True",
        "layernorm: always",
        repr(resolve(None).class_rules["layernorm"]),
    ):
        assert part in text, part


def test_packet_groups_overloads_by_entry():
    d = describe_op("aten.mul")
    by_first = {e.overloads[0]: e for e in d.entries}
    assert by_first[aten.mul.Tensor].spec.kind == "multilinear"
    assert by_first[aten.mul.Scalar].spec.kind == "affine"
    facts_only = [e for e in d.entries if e.spec is not None and e.spec.kind is None]
    assert facts_only and all(e.rule_classes == () for e in facts_only)
    assert "facts only" in str(d)


def test_op_without_an_entry_says_how_to_add_one():
    d = describe_op("aten.cumprod.default")
    (entry,) = d.entries
    assert entry.spec is None and entry.rule_classes == () and d.rule_classes == ()
    text = str(d)
    assert "no op-table entry" in text
    assert "dynlrp.register_op(torch.ops.aten.cumprod.default, KIND)" in text


@pytest.mark.parametrize("bad", ["aten.no_such_op", "aten.bmm.no_such_overload", "no_such_ns.op", "a.b.c.d", ""])
def test_unknown_op_names_raise_value_error(bad):
    with pytest.raises(ValueError, match="unknown op"):
        describe_op(bad)


def test_unknown_preset_and_bad_types():
    with pytest.raises(ValueError, match="unknown rules preset"):
        describe_op("aten.bmm", rules="no_such_preset")
    with pytest.raises(TypeError):
        describe_op(3)


# -- dynlrp info ----------------------------------------------------------------------------------------------------
def test_cli_info_op(capsys):
    assert main(["info", "--op", "aten.bmm"]) == 0
    out = capsys.readouterr().out
    assert out == str(describe_op("aten.bmm")) + "\n"
    assert "multilinear" in out and "bilinear" in out
    assert main(["info", "--op", "aten.bmm.default", "--rules", "dynamiclrp"]) == 0
    out = capsys.readouterr().out
    assert out == str(describe_op("aten.bmm.default", rules="dynamiclrp")) + "\n"
    assert "dynamiclrp: " in out and "by_op aten.bmm.default: Gamma(" in out


def test_cli_info_errors_exit_2(capsys):
    assert main(["info", "--op", "aten.no_such_op"]) == 2
    captured = capsys.readouterr()
    assert "dynlrp info: error: unknown op 'aten.no_such_op'" in captured.err and captured.out == ""
    assert main(["info", "--op", "aten.bmm", "--rules", "no_such_preset"]) == 2
    assert "unknown rules preset" in capsys.readouterr().err
    assert main(["info", "--rules", "lrp0"]) == 2
    assert "--rules needs --op" in capsys.readouterr().err


def test_cli_info_without_op_unchanged(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dynlrp-fx ") and "op table: " in out and "presets: " in out and "\npasses:\n" in out


def test_python_m_info_op():
    proc = subprocess.run(
        [sys.executable, "-m", "dynlrp_fx", "info", "--op", "aten.relu.default"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nonneg='always'" in proc.stdout and "identity: always" in proc.stdout


# -- layout ---------------------------------------------------------------------------------------------------------
def test_subcommands_and_argparse_only_in_the_cli_package():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == ["info", "coverage", "export", "demo", "explain", "evaluate", "cache"]
    pkg = ROOT / "dynlrp_fx"
    offenders = [
        str(p.relative_to(ROOT))
        for p in pkg.rglob("*.py")
        if "argparse" in p.read_text() and (pkg / "cli") not in p.parents
    ]
    assert offenders == []
