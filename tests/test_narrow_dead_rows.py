"""``narrow_dead_rows``: a ``select`` that alone reads a value moves towards the inputs, so the ops before it
compute only the selected row.

Oracles: the narrowed program's relevance, output and ledger equal those of the same analysis without the pass
(float64, several rule presets); the ``gradient`` preset still equals autograd; values that something else reads
(a second output, ``capture=``) stay whole.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynlrp_fx as dynlrp
from dynlrp_fx.errors import DynlrpInputError
from dynlrp_fx.explainer import Explainer
from dynlrp_fx.program import Analysis
from tests.helpers import GRADIENT_TOL, gradient_oracle_errors, tiny_bert

F64 = torch.float64


class _Tail(nn.Module):
    """A token classifier reading the last token (``y[:, -1]``) of a block with broadcast operands (a ``(1, 1,
    E)`` scale, a bias), a residual read twice and a LayerNorm. ``both``: it also returns ``y`` whole."""

    def __init__(self, both: bool = False):
        super().__init__()
        self.both = both
        self.scale = nn.Parameter(torch.randn(1, 1, 6) + 1)
        self.ln = nn.LayerNorm(6)
        self.lin1, self.lin2, self.head = nn.Linear(6, 8), nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.ln(x * self.scale)
        y = h + self.lin2(torch.relu(self.lin1(h))) + h
        out = self.head(y[:, -1])
        return (out, y) if self.both else out


def _whole(ex):
    """The same model and rules, analysed without narrow_dead_rows."""
    return Explainer(ex.model, ex.traced, ex.composite, backend="eager",
                     analysis=Analysis(ex.traced, ex.composite, narrow_rows=False))


def _narrowed(ex) -> int:
    return sum(1 for n in ex.analysis.graph.graph.nodes if "dynlrp_narrowed" in n.meta)


@pytest.mark.parametrize("rules", ["epsilon", "lrp0", "gradient"])
def test_a_selected_row_is_computed_alone_with_the_same_explanation(rules):
    torch.manual_seed(0)
    model = _Tail().double().eval()
    x = torch.randn(3, 5, 6, dtype=F64)
    ex = dynlrp.compile(model, x, rules=rules, backend="eager")
    # the block after the broadcast multiply runs on (B, E) rows: LayerNorm, both linears, relu, the two adds
    assert _narrowed(ex) >= 6
    # every linear runs on (B, features) rows, none on the (B*T, features) tokens
    mm = [n for n in ex.analysis.graph.graph.nodes if n.target is torch.ops.aten.addmm.default]
    assert len(mm) == 3 and all("*" not in str(n.meta["val"].shape[0]) for n in mm)
    whole = _whole(ex)
    assert _narrowed(whole) == 0
    t = torch.tensor([0, 2, 1])
    got, want = ex(x, target=t), whole(x, target=t)
    torch.testing.assert_close(got.output, want.output, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.conservation.absorbed, want.conservation.absorbed, rtol=1e-10, atol=1e-14)
    if rules == "gradient":
        errs = gradient_oracle_errors(ex(x), model, (x,), {})
        assert max(errs.values()) <= GRADIENT_TOL, errs


def test_a_value_read_elsewhere_stays_whole():
    """A second output that returns the block's value, or capture= of a module in it, keeps every row."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=F64)
    both = dynlrp.compile(_Tail(both=True).double().eval(), x, rules="epsilon", backend="eager", output=0)
    assert _narrowed(both) == 0
    model = _Tail().double().eval()
    cap = dynlrp.compile(model, x, rules="epsilon", backend="eager", capture=["lin2"])
    assert _narrowed(cap) == 0
    e = cap(x, target=1)
    assert e.captured["lin2"].shape == (2, 5, 6)
    torch.testing.assert_close(e.relevance, dynlrp.compile(model, x, rules="epsilon", backend="eager")(x, target=1)
                               .relevance, rtol=1e-12, atol=1e-14)


def test_conditions_on_a_narrowed_module():
    """condition= on a module whose output was narrowed to one row: its features (the last dim) give the same
    explanation as the whole program's; a token dim, which no longer exists, is refused with what to do."""
    torch.manual_seed(0)
    model = _Tail().double().eval()
    x = torch.randn(3, 5, 6, dtype=F64)
    ex = dynlrp.compile(model, x, rules="epsilon", backend="eager")
    whole = _whole(ex)
    got, want = ex(x, target=1, condition={"lin2": [0, 4]}), whole(x, target=1, condition={"lin2": [0, 4]})
    torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.conditioned["lin2"], want.conditioned["lin2"], rtol=1e-12, atol=1e-14)
    with pytest.raises(DynlrpInputError, match=r"only one row of 'lin2'.*capture=\['lin2'\]"):
        ex(x, target=1, condition={"lin2": dynlrp.targets.Features([0], dim=1)})


def test_bert_pooler_reads_one_token_of_the_last_layer():
    """BERT's pooler reads token 0: the last layer's attention output projection, LayerNorms and MLP run on one
    row per sample; AttnLRP's relevance equals the whole program's (float64)."""
    torch.manual_seed(0)
    model = tiny_bert().double()
    ids = torch.randint(0, 100, (2, 7))
    ex = dynlrp.compile(model, (ids,), backend="eager")
    last = [n for n in ex.analysis.graph.graph.nodes if n.target is torch.ops.aten.addmm.default
            and "layer.1.intermediate" in str(n.meta.get("nn_module_stack"))]
    assert last and all("*" not in str(n.meta["val"].shape[0]) for n in last)  # (B, 64), not (B*T, 64)
    got, want = ex(ids, target=1), _whole(ex)(ids, target=1)
    torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got.output, want.output, rtol=1e-12, atol=1e-14)


def test_narrowing_that_would_change_a_rule_is_not_kept():
    """A Llama-style block read at its last token: the select would stop at RMSNorm's mean (a reduction), so the
    normaliser's ``x * rsqrt(mean(x^2))`` would multiply a selected row by a selected statistic and lose its
    normaliser rule. The analysis compares the rules with the whole graph's and keeps the whole graph."""
    from tests.test_attnlrp import LlamaBlock

    torch.manual_seed(0)
    m = LlamaBlock().double().eval()
    x = torch.randn(2, 5, 8, dtype=F64)
    ex = dynlrp.compile(m, x, rules="attnlrp", backend="eager")
    assert _narrowed(ex) == 0
    records = [r for r in ex.analysis.report.records if r.name == "narrow_dead_rows"]
    assert len(records) == 2 and records[0].ran and not records[1].ran  # narrowed, then analysed whole
