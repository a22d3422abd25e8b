"""``dynlrp.coverage`` and ``dynlrp coverage``: per-op rows, node counts, uncovered ops, CLI exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from torch import nn

import dynlrp_fx as dynlrp
from dynlrp_fx.cli import main
from dynlrp_fx.coverage import CoverageReport, render_json, render_markdown
from tests.helpers import _CustomNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUSTOM = "dynlrp_cov.squish.default"


class ScaledLinear(nn.Module):
    """``x @ (2 w)``: the weight scaling is a parameter-only (constant) node, the matmul the only relevant one."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))

    def forward(self, x):
        return x @ (self.w * 2.0)


def test_counts_split_relevant_and_constant_nodes():
    rep = dynlrp.coverage(ScaledLinear(), torch.randn(2, 4, dtype=torch.float64), rules="lrp0")
    assert (rep.nodes, rep.relevant, rep.covered_nodes, rep.constant, rep.unique_ops) == (2, 1, 1, 1, 2)
    rows = {r.op: r for r in rep.rows}
    assert rows["aten.mm.default"].relevant == 1 and rows["aten.mm.default"].rule_classes == ["linear"]
    assert rows["aten.mul.Tensor"].relevant == 0 and rows["aten.mul.Tensor"].rule_classes == []
    # bias-free linear map under LRP-0: the ledger closes exactly
    assert rep.finite and rep.conservation_error < 1e-12
    assert rep.node_coverage == 100.0 and rep.ok and rep.inputs == ["x"]


def test_report_matches_an_independent_explanation():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 5)
    ).eval()
    x = torch.randn(3, 3, 8, 8)
    rep = dynlrp.coverage(model, x)
    expl = dynlrp.compile(model, x, backend="eager")(x)
    assert rep.conservation_error == float(expl.conservation.error.max())
    assert sum(r.count for r in rep.rows) == rep.nodes
    assert sum(r.relevant for r in rep.rows) == rep.relevant == rep.covered_nodes
    ex = dynlrp.compile(model, x, backend="eager")
    relevant = [r for r in ex.rule_table() if r["relevant"] and r["op"] != "<built-in function getitem>"]
    assert len(relevant) == rep.relevant
    rows = {r.op: r for r in rep.rows}
    assert rows["aten.convolution.default"].module_paths == ["0"]
    assert rows["aten.max_pool2d_with_indices.default"].rule_classes == ["route"]


def test_uncovered_custom_op_is_reported_with_its_module_path():
    rep = dynlrp.coverage(_CustomNet(), torch.randn(2, 4))
    assert rep.uncovered == {CUSTOM: ["block.act"]}
    assert not rep.ok and not rep.explained and rep.conservation_error is None
    assert (rep.relevant, rep.covered_nodes) == (3, 2)
    assert abs(rep.node_coverage - 200 / 3) < 1e-9
    assert CUSTOM in render_markdown([rep]) and "block.act" in str(rep)


def test_register_op_makes_it_covered():
    from dynlrp_fx.rules.table import OP_TABLE

    op = torch.ops.dynlrp_cov.squish.default
    try:
        dynlrp.register_op(op, "unary")
        rep = dynlrp.coverage(_CustomNet().double(), torch.randn(2, 4, dtype=torch.float64), rules="lrp0")
        assert rep.ok and rep.uncovered == {} and rep.node_coverage == 100.0
        assert {r.op: r.rule_classes for r in rep.rows}[CUSTOM] == ["identity"]
        assert rep.conservation_error < 1e-12
    finally:
        OP_TABLE.pop(op, None)


def test_output_callable_paths_are_the_users():
    rep = dynlrp.coverage(_CustomNet(), torch.randn(2, 4), output=lambda y: y[:, :2], explain=False)
    assert rep.uncovered == {CUSTOM: ["block.act"]}


def test_renderers_total_rows():
    a = CoverageReport(
        "a",
        "vision",
        nodes=10,
        relevant=6,
        covered_nodes=6,
        constant=4,
        unique_ops=3,
        conservation_error=1e-7,
        finite=True,
        explained=True,
    )
    b = CoverageReport("b", "text", nodes=5, relevant=5, covered_nodes=4, constant=0, unique_ops=2)
    md = render_markdown([a, b])
    assert "| model | modality | nodes | unique ops |" in md
    assert "| a | vision | 10 | 3 | 6 | 4 | 100.00% | 1.0e-07 |" in md
    assert "| **total (2 models)** | | 15 |" in md and "90.91%" in md  # 10 of 11 relevant nodes covered
    data = json.loads(render_json([a, b]))
    assert [m["covered"] for m in data["models"]] == [100.0, 80.0]
    assert data["total"] == {"models": 2, "nodes": 15, "relevant_nodes": 11, "covered_nodes": 10, "all_covered": False}
    for key in ("name", "nodes", "covered", "unique_ops", "conservation_error"):
        assert key in data["models"][0]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "dynlrp_fx", "coverage", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_exits_1_naming_the_custom_op_and_its_module():
    p = _cli("--model", "tests.helpers:custom_op_model", "--input-shape", "2,4")
    assert p.returncode == 1, p.stdout + p.stderr
    out = p.stdout + p.stderr
    assert CUSTOM in out and "block.act" in out
    assert f"no rule for {CUSTOM} (used by block.act)" in p.stderr


def test_cli_json_exits_0_when_covered(capsys):
    rc = main(
        [
            "coverage",
            "--model",
            "tests.helpers:covered_model",
            "--input-shape",
            "3,4",
            "--json",
            "--ops",
            "--dtype",
            "float64",
            "--rules",
            "lrp0",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    data = json.loads(out)
    (m,) = data["models"]
    assert m["covered"] == 100.0 and m["uncovered"] == {} and m["finite"] is True
    assert m["conservation_error"] < 1e-12  # LRP-0, ledger of a float64 MLP
    assert {o["op"] for o in m["ops"]} >= {"aten.addmm.default", "aten.gelu.default", "aten.native_layer_norm.default"}
    assert m["nodes"] == sum(o["count"] for o in m["ops"])


def test_cli_usage_errors(capsys):
    assert main(["coverage"]) == 2 and "--zoo" in capsys.readouterr().err
    assert main(["coverage", "--names", "no_such_model", "--no-explain"]) == 1
    assert "unknown zoo entry 'no_such_model'" in capsys.readouterr().err
    assert main(["coverage", "--model", "tests.helpers:covered_model"]) == 1
    assert "--input-shape" in capsys.readouterr().err
