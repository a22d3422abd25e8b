"""The pipeline as data: explainers on a shared trace are independent, coverage runs the compiler's analysis, the
pipeline report lists what ran, only the runner calls passes, and the op table is the one place an op is declared.
"""

from __future__ import annotations

import ast
import importlib
import operator
import pathlib
import re
from types import ModuleType

import pytest
import torch
from torch import nn

import dynlrp_fx
import dynlrp_fx as dynlrp
from dynlrp_fx import presets
from dynlrp_fx.errors import DynlrpUnsupportedOpError
from dynlrp_fx.explainer import Explainer
from dynlrp_fx.passes import PIPELINE
from dynlrp_fx.rules import table
from dynlrp_fx.trace import trace

aten = torch.ops.aten
_BN = "aten._native_batch_norm_legit_no_training.default"
_GETITEM = str(operator.getitem)


def _conv_bn_relu_linear() -> nn.Module:
    """Conv -> BN (non-trivial running statistics and affine) -> ReLU -> Linear, float64, eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return model.double().eval()


def _x() -> torch.Tensor:
    return torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _seed() -> torch.Tensor:
    return torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def _same(a, b) -> None:
    """Two explanations agree to 1e-12 (float64): output, input relevance, absorbed relevance."""
    for name in ("output", "relevance", "absorbed"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=1e-12, msg=name)


def _graph_signature(gm: torch.fx.GraphModule) -> list:
    return [(n.op, n.name, str(n.target), tuple(str(a) for a in n.args)) for n in gm.graph.nodes]


# -- explainers sharing one trace -----------------------------------------------------------------------------------
def test_two_explainers_on_one_trace_equal_fresh_ones_and_recompile_leaves_the_original():
    model, x, seed = _conv_bn_relu_linear(), _x(), _seed()
    traced = trace(model, (x,))
    traced_before = _graph_signature(traced.graph_module)
    a = Explainer(model, traced, presets.resolve("epsilon"), backend="eager")
    b = Explainer(model, traced, presets.resolve("epsilon_gamma_box"), backend="eager")
    for e in (a, b):  # no seed program yet: it is built lazily below, after both explainers exist
        assert not any("seed" in r.label for r in e.pipeline.records)
    fresh_a = dynlrp.compile(model, x, rules="epsilon", backend="eager")
    fresh_b = dynlrp.compile(model, x, rules="epsilon_gamma_box", backend="eager")

    # target mode, then seed mode (built lazily now, after both explainers exist)
    _same(a(x), fresh_a(x))
    _same(b(x), fresh_b(x))
    _same(a(x, seed=seed), fresh_a(x, seed=seed))
    _same(b(x, seed=seed), fresh_b(x, seed=seed))
    assert not torch.allclose(a(x).relevance, b(x).relevance)  # the composites do differ

    # each explainer analysed its own copy: the trace is untouched, only b folded its batch norm
    assert _graph_signature(traced.graph_module) == traced_before
    assert a.analysed_graph is not b.analysed_graph is not traced.graph_module
    targets = {name: {str(n.target) for n in e.analysed_graph.graph.nodes} for name, e in (("a", a), ("b", b))}
    assert _BN in targets["a"] and _BN not in targets["b"]
    assert a.rule_table() == fresh_a.rule_table()
    assert b.rule_table() == fresh_b.rule_table()

    # recompile shares the analysis and leaves the original alone
    table_before, graph_before = a.rule_table(), a.graph()
    records_before = list(a.pipeline.records)
    expl_before = a(x)
    r = a.recompile(promise_policy="keep")
    _same(r(x), expl_before)
    _same(r(x, seed=seed), a(x, seed=seed))
    assert r.analysis is a.analysis and r.promise_policy == "keep"
    assert a.promise_policy == "recompute" and a.backend == "eager"
    assert a.graph() is graph_before and a.rule_table() == table_before
    assert a.pipeline.records[: len(records_before)] == records_before
    assert len(a.pipeline.records) == len(records_before)  # r's passes are r's, not a's
    _same(a(x), expl_before)


# -- coverage runs the compiler's analysis ----------------------------------------------------------------------------
def _rules_by_op(explainer: Explainer) -> dict[str, tuple[int, list[str], list[str]]]:
    """``{op: (relevant nodes, rule classes, rule names)}`` of the explainer's relevant nodes (as coverage counts:
    tuple unpacking is not an op)."""
    nodes = {n.name: n for n in explainer.analysed_graph.graph.nodes}
    out: dict[str, tuple[int, set, set]] = {}
    for row in explainer.rule_table():
        if not row["relevant"] or row["op"] == _GETITEM:
            continue
        rule = nodes[row["node"]].meta["dynlrp"].rule
        assert row["rule"] == repr(rule)
        count, classes, names = out.setdefault(row["op"], (0, set(), set()))
        classes.add(row["rule_class"])
        names.add(getattr(rule, "name", type(rule).__name__))
        out[row["op"]] = (count + 1, classes, names)
    return {op: (c, sorted(cl), sorted(nm)) for op, (c, cl, nm) in out.items()}


@pytest.mark.parametrize("rules, folds", [("epsilon_gamma_box", True), ("epsilon", False)])
def test_coverage_reports_the_ops_and_rules_of_the_compiled_explainer(rules, folds):
    model, x = _conv_bn_relu_linear(), _x()
    rep = dynlrp.coverage(model, x, rules=rules, explain=False)
    explainer = dynlrp.compile(model, x, rules=rules, backend="eager")
    reported = {r.op: (r.relevant, r.rule_classes, r.rules) for r in rep.rows if r.relevant}
    assert reported == _rules_by_op(explainer)
    assert rep.relevant == sum(c for c, _cl, _nm in reported.values()) and rep.uncovered == {}
    ops = {r.op for r in rep.rows}
    assert ops == {str(n.target) for n in explainer.analysed_graph.graph.nodes if n.op == "call_function"} - {_GETITEM}
    assert (_BN in ops) is not folds  # the explainer folds the batch norm exactly when the composite asks


# -- the pipeline report ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rules, folds", [("epsilon_gamma_box", True), ("epsilon", False)])
def test_pipeline_report_lists_every_pass_with_time_and_node_counts(rules, folds, capsys):
    model, x = _conv_bn_relu_linear(), _x()
    explainer = dynlrp.compile(model, x, rules=rules, backend="eager", cache=False)  # the passes must run here
    analysis = [n for n in PIPELINE.names("analysis") if folds or n != "fold_batchnorm"]
    per_program = PIPELINE.names("synthesis") + ["reuse_buffers"]
    assert PIPELINE.names("backend") == ["reuse_buffers"]
    assert explainer.pipeline.names() == analysis + per_program

    print(explainer.pipeline)
    text = capsys.readouterr().out
    ran = [r for r in explainer.pipeline.records if r.ran]
    assert [r.name for r in ran] == explainer.pipeline.names()
    for r in ran:
        assert r.seconds >= 0 and r.nodes_in > 0 and r.nodes_out > 0
        line = rf"^  {re.escape(r.name)}\s+{r.seconds:.3f} s\s+{r.nodes_in} -> {r.nodes_out}\s+nodes$"
        assert re.search(line, text, re.M), (r, text)
    skipped = [r.name for r in explainer.pipeline.records if not r.ran]
    assert skipped == ([] if folds else ["fold_batchnorm"])
    for name in skipped:
        assert re.search(rf"^  {name}\s+skipped$", text, re.M)
    labels = ["analysis", "synthesis[target]", "backend[target, eager]"]
    for label in labels:
        assert re.search(rf"^{re.escape(label)}: \d+\.\d{{3}} s$", text, re.M), text
    # node counts chain within a stage and end at the graphs the explainer holds
    for label in labels:
        recs = [r for r in ran if r.label == label]
        assert all(p.nodes_out == q.nodes_in for p, q in zip(recs, recs[1:]))
    last = {r.label: r for r in ran}
    assert last["analysis"].nodes_out == len(explainer.analysed_graph.graph.nodes)
    assert last["synthesis[target]"].nodes_out == len(explainer.graph("target").graph.nodes)

    # a seed-mode call adds the synthesis and backend passes of the seed program (once)
    explainer(x, seed=_seed())
    explainer(x, seed=_seed())
    assert explainer.pipeline.names() == analysis + per_program + per_program
    seed_labels = {r.label for r in explainer.pipeline.records[len(ran) + len(skipped):]}
    assert seed_labels == {"synthesis[seed]", "backend[seed, eager]"}
    assert "synthesis[seed]" in repr(explainer.pipeline)


# -- architecture guard: only the runner calls passes ---------------------------------------------------------------
def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_env(tree: ast.Module, module: str, is_package: bool) -> dict[str, object]:
    """Local name -> object for the module-level and nested imports of a module (what calls can resolve to)."""
    env: dict[str, object] = {}
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                try:
                    mod = importlib.import_module(alias.name)
                except ImportError:
                    continue
                if alias.asname:
                    env[alias.asname] = mod
                else:
                    env[alias.name.partition(".")[0]] = importlib.import_module(alias.name.partition(".")[0])
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            name = (base + "." + node.module if node.module else base) if node.level else node.module
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            for alias in node.names:
                obj = getattr(mod, alias.name, None)
                if obj is None:
                    try:
                        obj = importlib.import_module(f"{name}.{alias.name}")
                    except ImportError:
                        continue
                env[alias.asname or alias.name] = obj
    return env


def _resolve(expr: ast.expr, env: dict[str, object]):
    if isinstance(expr, ast.Name):
        return env.get(expr.id)
    if isinstance(expr, ast.Attribute):
        base = _resolve(expr.value, env)
        if isinstance(base, ModuleType):
            return getattr(base, expr.attr, None)
    return None


def pass_calls(source: str, module: str, is_package: bool = False) -> list[str]:
    """Calls ``name(...)`` / ``module.name(...)`` in ``source`` (the code of ``module``) that resolve to a pass
    function of :data:`PIPELINE` defined in another module: ``["line: pass"]``."""
    passes = {p.fn: p.name for p in PIPELINE.passes}
    tree = ast.parse(source)
    env = _import_env(tree, module, is_package)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = _resolve(node.func, env)
            if fn in passes and getattr(fn, "__module__", None) != module:
                found.append(f"{node.lineno}: {passes[fn]}")
    return found


def test_only_the_pipeline_runner_calls_passes():
    assert [p.fn.__name__ for p in PIPELINE.passes] == PIPELINE.names()  # a pass is named after its function
    root = pathlib.Path(dynlrp_fx.__file__).parent
    runner = root / "passes" / "pipeline.py"
    offenders = {}
    files = sorted(root.rglob("*.py"))
    assert len(files) > 20
    for path in files:
        if path == runner:
            continue
        module = _module_name(path, root)
        calls = pass_calls(path.read_text(), module, path.name == "__init__.py")
        if calls:
            offenders[str(path.relative_to(root.parent))] = calls
    assert offenders == {}, f"passes called outside passes/pipeline.py (run them through PIPELINE.run): {offenders}"


def test_the_architecture_guard_sees_direct_and_module_calls():
    src = (
        "from dynlrp_fx.passes.lower import lower\n"
        "from dynlrp_fx.passes import fold_batchnorm as fb\n"
        "import dynlrp_fx.passes.pair as pairing\n"
        "def f(gm, ctx, name):\n"
        "    name.lower()\n"  # a str method of the same name is no pass call
        "    gm.graph.eliminate_dead_code()\n"
        "    lower(gm, ctx)\n"
        "    fb.fold_batchnorm(gm, ctx)\n"
        "    return pairing.pair(gm, ctx)\n"
    )
    assert pass_calls(src, "dynlrp_fx.elsewhere") == ["7: lower", "8: fold_batchnorm", "9: pair"]
    assert pass_calls(src, "dynlrp_fx.passes.lower") == ["8: fold_batchnorm", "9: pair"]  # its own module may


# -- the op table ---------------------------------------------------------------------------------------------------
def test_op_table_rejects_unknown_aten_names():
    with pytest.raises(ValueError, match="aten.definitely_not_an_op does not exist"):
        table._reg("unary", "definitely_not_an_op")
    with pytest.raises(ValueError, match="aten.relu.NoSuchOverload does not exist"):
        table._facts("relu.NoSuchOverload", cheap=True)
    assert table._resolve("relu.default") == [aten.relu.default]
    for name in table.VERSION_DEPENDENT:  # skipped where this torch lacks them, resolved where it has them
        assert table._resolve(name) == ([getattr(aten, name)] if hasattr(aten, name) else [])


def test_register_op_keeps_the_facts_it_is_not_given(monkeypatch):
    relu = aten.relu.default
    spec = table.OP_TABLE[relu]
    assert spec.kind == "unary" and spec.nonneg == "always" and spec.activation
    monkeypatch.setitem(table.OP_TABLE, relu, spec)  # restored after the test
    table.register_op(relu, "unary")
    assert table.OP_TABLE[relu] == spec
    table.register_op(relu, cheap=True)
    assert table.OP_TABLE[relu].kind == "unary" and table.OP_TABLE[relu].nonneg == "always"
    assert table.OP_TABLE[relu].cheap
    table.register_op(relu, "route", overwrite=False)  # an existing entry is left alone
    assert table.OP_TABLE[relu].kind == "unary"
    with pytest.raises(TypeError, match="unknown fields"):
        table.register_op(relu, nonnegative="always")


_lib = torch.library.Library("dynlrp_pipe", "DEF")
_lib.define("shifted(Tensor x) -> Tensor")


@torch.library.impl(_lib, "shifted", "CompositeExplicitAutograd")
def _shifted(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x) + 0.5 * x


@torch.library.register_fake("dynlrp_pipe::shifted")
def _shifted_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _Shifted(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.dynlrp_pipe.shifted(x)


def test_registering_a_custom_op_is_enough_for_every_pass(monkeypatch):
    """A custom op registered as an elementwise nonlinearity gets a rule (coverage agrees), and ``cheap=True`` is
    all the ``recompute`` memory policy needs to rematerialise it in the relevance half."""
    op = torch.ops.dynlrp_pipe.shifted.default
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), _Shifted(), nn.Linear(8, 3)).double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    assert op not in table.OP_TABLE
    with pytest.raises(DynlrpUnsupportedOpError):
        dynlrp.compile(model, x, backend="eager")
    assert dynlrp.coverage(model, x, explain=False).uncovered == {str(op): ["1"]}

    monkeypatch.setitem(table.OP_TABLE, op, table.OpSpec(None))  # removed again after the test
    counts, relevance = {}, {}
    for cheap in (False, True):
        dynlrp.register_op(op, "unary", cheap=cheap)
        explainer = dynlrp.compile(model, x, backend="eager", promise_policy="recompute")
        counts[cheap] = sum(n.target is op for n in explainer.graph().graph.nodes)
        relevance[cheap] = explainer(x).relevance
        rows = [r for r in explainer.rule_table() if r["op"] == str(op)]
        assert [r["rule_class"] for r in rows] == ["identity"]
    assert counts == {False: 1, True: 2}  # the forward call, plus its recomputation in the relevance half
    torch.testing.assert_close(relevance[True], relevance[False], rtol=0, atol=1e-12)
    rep = dynlrp.coverage(model, x, explain=False)
    assert rep.uncovered == {} and next(r for r in rep.rows if r.op == str(op)).rule_classes == ["identity"]


def test_a_raw_error_inside_a_pass_is_named_as_an_internal_error():
    """A pass that fails with a raw Python error surfaces as DynlrpInternalError naming the pass, with the original
    chained; errors meant for the user (Dynlrp*, ValueError) pass through unchanged."""
    from dynlrp_fx.errors import DynlrpInternalError
    from dynlrp_fx.passes import CompileContext
    from dynlrp_fx.passes.pipeline import Pass, Pipeline

    def broken(gm, ctx):
        return [][0]

    def refuses(gm, ctx):
        raise ValueError("promise_policy must be one of ...")

    gm = torch.fx.symbolic_trace(nn.Linear(2, 2))
    with pytest.raises(DynlrpInternalError, match=r"pass 'broken' \(analysis stage\) failed: IndexError") as info:
        Pipeline([Pass("broken", broken, "analysis")]).run(gm, CompileContext())
    assert isinstance(info.value.__cause__, IndexError) and isinstance(info.value, RuntimeError)
    with pytest.raises(ValueError, match="promise_policy"):
        Pipeline([Pass("refuses", refuses, "analysis")]).run(gm, CompileContext())


def _lowered_by_retrace(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The lowering as it was before ``lower`` traced only what is not ATen: one ``make_fx`` of the whole paired
    graph (forward half included), views rewritten to reshapes. The reference the stamped lowering must equal."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from dynlrp_fx.passes.canonicalize import views_to_reshape

    fake_args = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        ref = make_fx(gm, tracing_mode="symbolic", _allow_non_fake_inputs=False)(*fake_args)
    views_to_reshape(ref)
    ref.recompile()
    return ref


def _tiny_bert_inputs():
    from tests.helpers import tiny_bert

    torch.manual_seed(0)
    ids = torch.randint(0, 128, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    return tiny_bert(num_hidden_layers=3), (), {"input_ids": ids, "attention_mask": mask}


def _cnn_inputs():
    from tests.helpers import pooled_cnn

    return pooled_cnn(), (torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)),), {}


# the BERT cases take ~20-26 s each: they run in CI's slow step (`make test-slow-ci`), the CNN ones by default
_RETRACE_CASES = [
    pytest.param(build, rules, policy, id=f"{bid}-{rules}-{policy}", marks=[pytest.mark.slow] if bid == "bert" else [])
    for bid, build in (("bert", _tiny_bert_inputs), ("cnn", _cnn_inputs))
    for rules in ("epsilon", "attnlrp", "epsilon_gamma_box", "by_path")
    for policy in ("recompute", "keep")
]


@pytest.mark.parametrize("build,rules,policy", _RETRACE_CASES)
def test_lower_traces_only_rule_code_and_equals_a_whole_graph_retrace(build, rules, policy):
    """``lower`` copies ATen nodes and stamps one trace per (callable, operand metadata) for the layers that repeat
    it; its program computes bit-identical values to a ``make_fx`` retrace of the whole paired graph (with the
    constants rule code makes: ``epsilon_gamma_box``'s z^B bounds on the CNN). ``by_path``
    gives one layer its own epsilon: its ops have the same operand metadata as the other layers' but must not share
    their traces."""
    from dynlrp_fx.program import Analysis
    from dynlrp_fx.rules import Composite, Epsilon
    from tests.helpers import call_args

    model, args, kwargs = build()
    if rules == "by_path":
        rules = Composite(by_path={"bert.encoder.layer.1.*" if build is _tiny_bert_inputs else "4": Epsilon(0.25)})
    explainer = dynlrp.compile(model, args, example_kwargs=kwargs, rules=rules, promise_policy=policy)
    analysis = explainer.analysis
    if build is _tiny_bert_inputs:  # three identical layers: narrow_dead_rows would give the last its own shapes
        analysis = Analysis(explainer.traced, explainer.composite, narrow_rows=False)
    ctx = analysis.context("target", policy)
    paired = PIPELINE.run(analysis.graph, ctx, only=["pair", "resolve_promises"])
    ours = PIPELINE.run(paired, ctx, only=["lower"])
    ref = _lowered_by_retrace(paired)
    assert not any(n.op == "call_function" and not isinstance(n.target, torch._ops.OpOverload)
                   and n.target not in (operator.getitem, operator.mul, operator.floordiv)
                   for n in ours.graph.nodes), "rule code left in the lowered graph"
    if build is _tiny_bert_inputs:  # its 3 layers share their traces
        relevance_ops = sum(1 for n in paired.graph.nodes if n.op == "call_function" and "dynlrp_rule" in n.meta)
        assert len(ctx.traces) < relevance_ops / 2
    with torch.no_grad():
        inputs = call_args(explainer, args, kwargs)
        got, want = ours(*inputs), ref(*inputs)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
