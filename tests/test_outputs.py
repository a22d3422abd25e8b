"""Which output is explained: mutation outputs, integer and non-tensor outputs, several outputs in one run, and
outputs without a batch dimension.

Oracles: LRP-0 equals gradient x input on piecewise-linear nets (the explained output is the model's real output);
the ``gradient`` preset equals autograd's gradient x input of the selected output entry (any op); LRP is linear in
the seed, so one run over several outputs equals the sum of the single-output runs; a loaded file equals the live
explainer; the model's buffers and inputs are unchanged by compile and explain.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynlrp_fx as dynlrp
from dynlrp_fx.errors import DynlrpError, DynlrpInputError, DynlrpTraceError
from dynlrp_fx.trace import trace
from tests.helpers import tiny_bert

F64 = torch.float64


def _gxi(model, x: torch.Tensor, select) -> torch.Tensor:
    """Gradient x input of ``select(model(x))`` (a scalar), on a copy of ``x`` (the model may write to it)."""
    xx = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(select(model(xx.clone())), xx)
    return (g * x).detach()


def _picked(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The sum over samples of ``y[b, target[b]]`` (flattened per sample)."""
    flat = y.reshape(y.shape[0], -1)
    return flat[torch.arange(flat.shape[0]), target].sum()


# -- mutation outputs -----------------------------------------------------------------------------------------------
class _MutatesInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))

    def forward(self, x):
        x.mul_(2)  # export lists the mutated input among the graph's outputs, before the logits
        return self.lin(x)


class _UpdatesBuffers(nn.Module):
    """A call counter and an EMA of the inputs (export's BUFFER_MUTATION outputs)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.zeros(8))

    def forward(self, x):
        self.calls.add_(1)
        self.ema.mul_(0.9).add_(0.1 * x.mean(0).detach())
        return self.lin(x)


@pytest.mark.parametrize("cls", [_MutatesInput, _UpdatesBuffers], ids=["input_mutation", "buffer_mutation"])
def test_mutation_outputs_are_never_explained(cls):
    torch.manual_seed(0)
    model = cls().double()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    x = torch.randn(4, 8, dtype=F64)
    explainer = dynlrp.compile(model, (x.clone(),), rules="lrp0")
    target = torch.tensor([0, 3, 1, 2])
    arg = x.clone()
    expl = explainer(arg, target=target)
    assert torch.equal(arg, x), "the explainer wrote to the caller's input"
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), f"buffer {k} changed by compile/explain"
    assert expl.output.shape == (4, 4)  # the logits, not the mutated (4, 8) input
    torch.testing.assert_close(expl.output, model(x.clone()) if cls is _MutatesInput else model.lin(x))
    torch.testing.assert_close(expl.relevance, _gxi(model, x, lambda y: _picked(y, target)), atol=1e-12, rtol=1e-9)


# -- integer and non-tensor outputs ---------------------------------------------------------------------------------
class _Heads(nn.Module):
    """Returns ``kind``: (argmax, logits), (None, logits, str), only non-tensors, or only integers."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.lin = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))

    def forward(self, x):
        y = self.lin(x)
        if self.kind == "argmax_logits":
            return y.argmax(-1), y
        if self.kind == "none_str":
            return None, y, "label"
        if self.kind == "ints":
            return y.argmax(-1), (y > 0)
        return None, "nothing"


@pytest.mark.parametrize("kind", ["argmax_logits", "none_str"])
def test_default_output_is_the_first_floating_tensor(kind):
    torch.manual_seed(0)
    model = _Heads(kind).double()
    x = torch.randn(3, 6, dtype=F64)
    explainer = dynlrp.compile(model, (x,), rules="lrp0")
    expl = explainer(x)
    torch.testing.assert_close(expl.output, model.lin(x))
    target = model.lin(x).argmax(1)
    torch.testing.assert_close(expl.relevance, _gxi(model.lin, x, lambda y: _picked(y, target)), atol=1e-12, rtol=1e-9)


def test_outputs_that_carry_no_relevance_are_refused():
    x = torch.randn(3, 6)
    with pytest.raises(DynlrpTraceError, match=r"selects '\[0\]', which is a tensor int64 \(3,\).*floating"):
        dynlrp.compile(_Heads("argmax_logits"), (x,), output=0)
    for kind in ("ints", "nothing"):
        with pytest.raises(DynlrpTraceError, match="returns no floating tensor"):
            dynlrp.compile(_Heads(kind), (x,))
    with pytest.raises(ValueError, match="not an output of the model"):
        dynlrp.compile(_Heads("argmax_logits"), (x,), output="logits")


# -- several outputs ------------------------------------------------------------------------------------------------
class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 10), nn.ReLU())
        self.a = nn.Linear(10, 4)
        self.b = nn.Linear(10, 3)

    def forward(self, x):
        h = self.body(x)
        return {"a": self.a(h), "b": self.b(h)}


@pytest.fixture(scope="module")
def two_heads():
    torch.manual_seed(0)
    model = _TwoHeads().double()
    x = torch.randn(3, 6, dtype=F64)
    both = dynlrp.compile(model, (x,), rules="lrp0", output=["a", "b"])
    single = {k: dynlrp.compile(model, (x,), rules="lrp0", output=k) for k in ("a", "b")}
    return model, both, single


def test_two_outputs_one_sweep_equals_gradient_and_sum_of_singles(two_heads):
    model, both, single = two_heads
    x = torch.randn(5, 6, dtype=F64)
    t1, t2 = torch.tensor([0, 3, 1, 2, 0]), torch.tensor([2, 0, 1, 1, 0])
    expl = both(x, target={"a": t1, "b": t2})
    assert set(expl.output) == {"a", "b"}
    out = model(x)
    torch.testing.assert_close(expl.output["b"], out["b"])
    ref = _gxi(model, x, lambda o: _picked(o["a"], t1) + _picked(o["b"], t2))
    torch.testing.assert_close(expl.relevance, ref, atol=1e-12, rtol=1e-9)
    one, two = single["a"](x, target=t1), single["b"](x, target=t2)
    torch.testing.assert_close(expl.relevance, one.relevance + two.relevance, atol=1e-12, rtol=1e-9)
    seed = out["a"][torch.arange(5), t1] + out["b"][torch.arange(5), t2]
    torch.testing.assert_close(expl.conservation.seed, seed)
    assert float(expl.conservation.error.max()) < 1e-9
    # a tuple of targets, one per output (None: argmax), gives the same as the dict
    torch.testing.assert_close(both(x, target=(t1, None)).relevance,
                               one.relevance + single["b"](x).relevance, atol=1e-12, rtol=1e-9)
    # seeds, one per output
    s1, s2 = torch.randn(5, 4, dtype=F64), torch.randn(5, 3, dtype=F64)
    torch.testing.assert_close(both(x, seed={"a": s1, "b": s2}).relevance,
                               single["a"](x, seed=s1).relevance + single["b"](x, seed=s2).relevance,
                               atol=1e-12, rtol=1e-9)


def test_two_outputs_bad_targets_and_seeds(two_heads):
    _, both, _ = two_heads
    x = torch.randn(2, 6, dtype=F64)
    with pytest.raises(DynlrpInputError, match=r"names \['c'\], which are not explained outputs"):
        both(x, target={"c": 1})
    with pytest.raises(DynlrpInputError, match="explains 2 outputs"):
        both(x, target=1)
    with pytest.raises(DynlrpInputError, match=r"out of range for 'b'"):
        both(x, target={"b": 3})
    with pytest.raises(DynlrpInputError, match=r"no seed for \['b'\]"):
        both(x, seed={"a": torch.randn(2, 4, dtype=F64)})
    with pytest.raises(DynlrpInputError, match=r"expected the explained output's shape \(2, 3\)"):
        both(x, seed={"a": torch.randn(2, 4, dtype=F64), "b": torch.randn(2, 4, dtype=F64)})
    with pytest.raises(ValueError, match="more than once"):
        dynlrp.compile(_TwoHeads(), (x.float(),), output=["a", "a"])


def test_two_outputs_export_and_load(two_heads, tmp_path):
    _, both, _ = two_heads
    path = str(tmp_path / "two.pt2")
    dynlrp.export(both, path)
    loaded = dynlrp.load(path)
    for b in (2, 5):
        x = torch.randn(b, 6, dtype=F64)
        seeds = {"a": torch.randn(b, 4, dtype=F64), "b": torch.randn(b, 3, dtype=F64)}
        for kw in ({"target": {"b": 1}}, {"seed": seeds}):
            live, got = both(x, **kw), loaded(x, **kw)
            assert set(got.output) == {"a", "b"}
            for k in live.output:
                torch.testing.assert_close(got.output[k], live.output[k], atol=0, rtol=0)
            torch.testing.assert_close(got.relevance, live.relevance, atol=0, rtol=0)
            torch.testing.assert_close(got.conservation.seed, live.conservation.seed, atol=0, rtol=0)


@pytest.mark.slow  # ~28 s: in CI's slow step (test-slow-ci)
def test_question_answering_start_and_end_in_one_run():
    """DynamicLRP's SQuAD setting: start and end logits of a BERT QA head seeded together, each at its argmax."""
    torch.manual_seed(0)
    model = tiny_bert("BertForQuestionAnswering", num_hidden_layers=1, num_labels=2)
    ids = torch.randint(0, 128, (2, 6))
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert trace(model, (), kw).explained_outputs == ["start_logits"]  # the default: the first floating output
    both = dynlrp.compile(model, example_kwargs=kw, output=["start_logits", "end_logits"])
    single = [dynlrp.compile(model, example_kwargs=kw, output=k) for k in ("start_logits", "end_logits")]
    expl = both(**kw)
    parts = [s(**kw) for s in single]
    out = model(**kw)
    for k in ("start_logits", "end_logits"):
        torch.testing.assert_close(expl.output[k], out[k])
    total = parts[0].inputs["input_ids"] + parts[1].inputs["input_ids"]
    torch.testing.assert_close(expl.inputs["input_ids"], total, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(expl.conservation.seed, out.start_logits.amax(1) + out.end_logits.amax(1))


# -- outputs without a batch dimension ------------------------------------------------------------------------------
class _Op(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.lin(x))


class _GraphNet(nn.Module):
    """Message passing over the nodes of one graph (``x``: node features, ``adj``: (N, N)), pooled to a score."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)

    def forward(self, x, adj):
        return (adj @ self.lin(x)).relu().mean(0)


_SWEEP = {
    "sum": lambda y: y.sum(),
    "mean_dim0": lambda y: y.mean(0),
    "chunk_dim0": lambda y: y.chunk(2, 0)[0],
    "diagonal": lambda y: y.diagonal(),
    "gram": lambda y: y.T @ y,
    "index_select_dim0": lambda y: y.index_select(0, torch.tensor([0, 2])),
    "select_dim0": lambda y: y[0],
    "flatten": lambda y: y.flatten(),
    "max_dim0": lambda y: y.max(0).values,
    "mse_loss": lambda y: F.mse_loss(y, torch.zeros_like(y)),
    "cat_dim0": lambda y: torch.cat([y, y], 0),
    "unsqueeze0": lambda y: y.unsqueeze(0),
    "expand_literal": lambda y: y.sum(0, keepdim=True).expand(3, 5),
    "outer": lambda y: y @ y.T,  # (B, B): dimension 0 is the batch
}


@pytest.mark.parametrize("name", list(_SWEEP))
def test_outputs_without_a_batch_dimension(name):
    """A correct explanation (the gradient preset equals autograd's gradient x input of the explained entries) or a
    ``Dynlrp*`` error, never a raw exception from inside the passes."""
    torch.manual_seed(0)
    model = _Op(_SWEEP[name]).double()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            explainer = dynlrp.compile(model, (torch.randn(3, 5, dtype=F64),), rules="gradient")
    except DynlrpError:
        return
    for b in (3, 4):
        x = torch.randn(b, 5, dtype=F64)
        y = model(x)
        try:
            expl = explainer(x, target=1)
        except DynlrpError:
            continue
        torch.testing.assert_close(expl.output, y)
        if expl.conservation.seed.shape[0] == b:  # dimension 0 is the batch: one target per sample
            ones = torch.ones(b, dtype=torch.long)
            ref = _gxi(model, x, lambda o, t=ones: _picked(o, t))
        else:
            ref = _gxi(model, x, lambda o: o.reshape(-1)[1])
            assert expl.conservation.seed.shape == (1,)
            torch.testing.assert_close(expl.conservation.seed, y.reshape(-1)[1:2])
        torch.testing.assert_close(expl.relevance, ref, atol=1e-12, rtol=1e-9)
        assert float(expl.conservation.error.max()) < 1e-9


def test_unbatched_output_is_one_sample_per_call(tmp_path):
    """A 0-d score: target indexes the flattened output (one per call), the ledger is a (1,) total; a graph network
    pooled over its nodes; per-sample targets are refused with what to give instead; a loaded file agrees."""
    torch.manual_seed(0)
    model = _Op(lambda y: y.relu().sum(1).max()).double()  # piecewise linear: LRP-0 == gradient x input
    explainer = dynlrp.compile(model, (torch.randn(3, 5, dtype=F64),), rules="lrp0")
    assert not explainer.call_spec.output_batched
    x = torch.randn(6, 5, dtype=F64)
    expl = explainer(x)
    assert expl.output.shape == () and expl.conservation.seed.shape == (1,) and expl.absorbed.shape == (1,)
    torch.testing.assert_close(expl.relevance, _gxi(model, x, lambda o: o), atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(expl.conservation.seed, model(x).reshape(1))
    torch.testing.assert_close(expl.conservation.inputs + expl.absorbed, expl.conservation.seed)
    with pytest.raises(DynlrpInputError, match="has no batch dimension, so a call is explained as one sample"):
        explainer(x, target=[0] * 6)
    with pytest.raises(DynlrpInputError, match=r"out of range for .* the output \(flattened\) has 1 entries"):
        explainer(x, target=1)
    path = str(tmp_path / "score.pt2")
    dynlrp.export(explainer, path)
    loaded = dynlrp.load(path)
    got = loaded(x)
    torch.testing.assert_close(got.relevance, expl.relevance, atol=0, rtol=0)
    torch.testing.assert_close(got.conservation.seed, expl.conservation.seed, atol=0, rtol=0)
    seed = torch.tensor(2.0, dtype=F64)
    torch.testing.assert_close(loaded(x, seed=seed).relevance, explainer(x, seed=seed).relevance, atol=0, rtol=0)

    gnn = _GraphNet().double()
    nodes, adj = torch.randn(4, 5, dtype=F64), (torch.rand(4, 4, dtype=F64) > 0.5).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gx = dynlrp.compile(gnn, (nodes, adj), rules="gradient")  # adj @ h is bilinear: the gradient oracle
    assert not gx.call_spec.output_batched
    expl = gx(nodes, adj, target=2)
    ref = _gxi(lambda v: gnn(v, adj), nodes, lambda o: o[2])
    torch.testing.assert_close(expl.inputs["x"], ref, atol=1e-12, rtol=1e-9)
    assert float(expl.conservation.error.max()) < 1e-9

