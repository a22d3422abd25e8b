"""Inputs and weights of any strides: ``channels_last``, transposed, sliced and expanded tensors, live and loaded.

Oracle: LRP-0 equals gradient x input on piecewise-linear nets, whatever the strides of the input or of the
model's weights, for the live explainer and for the file ``dynlrp.export`` writes (loaded in process, as
``tests/test_export.py``'s metadata test does); the gradient preset gives a strided token input the relevance of
its contiguous copy.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynlrp_fx as dynlrp
from tests.helpers import grad_x_input, pooled_cnn, tiny_bert

TOL = dict(rtol=1e-5, atol=1e-6)


def _strided(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``x``'s values under other strides: channels_last, a transposed view, a strided slice, an expanded sample."""
    wide = torch.stack([x, torch.zeros_like(x)], -1).flatten(-2)  # x at the even positions of the last dim
    return {
        "channels_last": x.to(memory_format=torch.channels_last),
        "transposed": x.transpose(2, 3).contiguous().transpose(2, 3),
        "sliced": wide[..., ::2],
        "expanded": x[:1].expand_as(x),
    }


def _check(explainer, model, x: torch.Tensor, target: int = 1) -> None:
    """Relevance of ``x`` (any strides) equals gradient x input of its contiguous copy and the relevance of that
    copy, and the bias-free ledger closes up to the biases' absorbed share."""
    got = explainer(x, target=target)
    dense = explainer(x.contiguous(), target=target)
    ref = grad_x_input(model, x.contiguous(), target)
    assert torch.isfinite(got.relevance).all()
    torch.testing.assert_close(got.relevance, ref, **TOL)
    torch.testing.assert_close(got.relevance, dense.relevance, **TOL)
    torch.testing.assert_close(got.output, dense.output, **TOL)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    torch.manual_seed(0)
    model = pooled_cnn()
    explainer = dynlrp.compile(model, torch.randn(2, 3, 8, 8), rules="lrp0", backend="eager")
    path = dynlrp.export(explainer, tmp_path_factory.mktemp("mf") / "cnn.pt2", modes=("target",))
    return model, explainer, dynlrp.load(path)


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced", "expanded"])
def test_strided_input_live_and_loaded(cnn, layout):
    model, explainer, loaded = cnn
    torch.manual_seed(1)
    x = _strided(torch.randn(3, 3, 8, 8))[layout]
    assert not x.is_contiguous()
    _check(explainer, model, x)
    _check(loaded, model, x)


def test_lowered_graph_has_no_stride_assuming_view(cnn):
    """The flatten and the ledger's per-sample sums are ``reshape`` (a ``view`` that changes the shape holds only for
    the traced strides); the only views left keep their operand's shape (``unify_batch`` ties batch sizes)."""
    _, explainer, _ = cnn
    nodes = [n for n in explainer.graph("target").graph.nodes if n.op == "call_function"]
    assert any(n.target is torch.ops.aten.reshape.default for n in nodes)
    views = [n for n in nodes if n.target in (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)]
    for n in views:
        assert [str(s) for s in n.meta["val"].shape] == [str(s) for s in n.args[0].meta["val"].shape], n.format_node()


@pytest.mark.parametrize("when", ["before_compile", "after_compile"])
def test_channels_last_model(tmp_path, when):
    """``model.to(memory_format=torch.channels_last)`` before compiling (traced with channels_last weights) or after
    (the explainer reads the converted weights at each call); every input layout, live and loaded."""
    torch.manual_seed(0)
    model = pooled_cnn()
    example = torch.randn(2, 3, 8, 8)
    if when == "before_compile":
        model = model.to(memory_format=torch.channels_last)
        example = example.to(memory_format=torch.channels_last)
    explainer = dynlrp.compile(model, example, rules="lrp0", backend="eager")
    if when == "after_compile":
        model = model.to(memory_format=torch.channels_last)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert not model[0].weight.is_contiguous()
    loaded = dynlrp.load(dynlrp.export(explainer, tmp_path / "cl.pt2", modes=("target",)))
    torch.manual_seed(1)
    x = torch.randn(3, 3, 8, 8)
    for v in (x, *_strided(x).values()):
        _check(explainer, model, v)
        _check(loaded, model, v)


def test_transposed_matrix_input():
    """A 2-d input given as a transposed view (column-major) on an MLP."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    explainer = dynlrp.compile(model, torch.randn(4, 5), rules="lrp0", backend="eager")
    x = torch.randn(5, 4).t()
    assert not x.is_contiguous()
    _check(explainer, model, x, target=2)


def test_strided_token_inputs():
    """Token ids as a transposed view and an expanded attention mask give the relevance of their contiguous copies
    (gradient preset: the same ops on the same values)."""
    torch.manual_seed(0)
    model = tiny_bert(num_hidden_layers=1)
    ids = torch.randint(0, 128, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    explainer = dynlrp.compile(model, example_kwargs={"input_ids": ids, "attention_mask": mask}, rules="gradient")
    ref = explainer(input_ids=ids, attention_mask=mask)
    got = explainer(input_ids=ids.t().contiguous().t(), attention_mask=mask[:1].expand(3, 10))
    torch.testing.assert_close(got.output, ref.output, rtol=0, atol=0)
    torch.testing.assert_close(got.inputs["input_ids"], ref.inputs["input_ids"], rtol=0, atol=0)
