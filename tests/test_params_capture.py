"""Parameter relevance (``params=``) and intermediate relevance (``capture=``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynlrp_fx as dynlrp
from tests.helpers import tiny_bert


def _mlp_bias_free() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8, bias=False),
        nn.ReLU(),
        nn.Sequential(nn.Linear(8, 7, bias=False), nn.ReLU()),
        nn.Linear(7, 4, bias=False),
    ).double()


def _cnn_bias_free() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 2 * 2, 3, bias=False),
    ).double()


def test_mlp_captured_cuts_conserve_the_seed_and_params_keep_input_relevance():
    model = _mlp_bias_free()
    x = torch.randn(5, 6, dtype=torch.float64)
    plain = dynlrp.compile(model, x, rules="lrp0", backend="eager")
    cuts = ["0", "1", "2", "2.0", "3"]
    ex = dynlrp.compile(model, x, rules="lrp0", backend="eager", params=True, capture=cuts)
    a, b = plain(x, target=2), ex(x, target=2)
    # input relevance is unchanged by requesting params/capture (up to rounding: params= keeps the relevance form,
    # the plain program runs the gradient form)
    torch.testing.assert_close(a.relevance, b.relevance, rtol=1e-12, atol=1e-15)
    assert set(b.captured) == set(cuts)
    seed = b.conservation.seed
    assert seed.abs().min() > 0
    for path in cuts:
        r = b.captured[path]
        assert r.shape[0] == x.shape[0]
        assert (r.reshape(5, -1).sum(1) - seed).abs().max() <= 1e-9, path
    # every full layer of weights receives the whole (batch-summed) seed under LRP-0 without biases
    for name, p in model.named_parameters():
        assert b.params[name].shape == p.shape
        assert abs(float(b.params[name].sum() - seed.sum())) <= 1e-9, name


def test_cnn_capture_and_conv_weight_relevance():
    model = _cnn_bias_free()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    ex = dynlrp.compile(model, x, rules="lrp0", backend="eager", params=True, capture=["1", "2", "4", "5"])
    e = ex(x)
    seed = e.conservation.seed
    for path, r in e.captured.items():
        assert (r.reshape(3, -1).sum(1) - seed).abs().max() <= 1e-9, path
    assert e.captured["2"].shape == (3, 4, 4, 4)
    assert e.captured["5"].shape == (3, 20)
    for name, p in model.named_parameters():
        assert e.params[name].shape == p.shape
        assert abs(float(e.params[name].sum() - seed.sum())) <= 1e-9, name


def test_linear_parameter_relevance_matches_the_z_rule_formula():
    torch.manual_seed(2)
    lin = nn.Linear(5, 3).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    eps = 1e-3
    ex = dynlrp.compile(lin, x, rules=dynlrp.presets.epsilon(eps), backend="eager", params=["weight", "bias"])
    target = torch.tensor([0, 1, 2, 1])
    e = ex(x, target=target)
    z = lin(x).detach()
    R = torch.zeros_like(z).scatter(1, target[:, None], z.gather(1, target[:, None]))
    s = R / (z + eps * (z.sign() + (z == 0).double()))
    W, bias = lin.weight.detach(), lin.bias.detach()
    ref_w = W * (s.T @ x)
    ref_b = bias * s.sum(0)
    torch.testing.assert_close(e.params["weight"], ref_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(e.params["bias"], ref_b, rtol=1e-12, atol=1e-12)
    # the bias' relevance is the relevance the ledger says was absorbed (weights account for the inputs)
    torch.testing.assert_close(e.params["weight"].sum(), e.relevance.sum(), rtol=1e-12, atol=1e-12)


def test_params_and_capture_through_an_output_callable_and_embeddings():
    pytest.importorskip("transformers")
    torch.manual_seed(3)
    model = tiny_bert(vocab_size=50, hidden_size=16, num_hidden_layers=1, intermediate_size=32, max_position_embeddings=16)
    ids = torch.randint(1, 50, (2, 7))
    mask = torch.ones_like(ids)
    ex = dynlrp.compile(
        model,
        example_kwargs={"input_ids": ids, "attention_mask": mask},
        backend="eager",
        output=lambda out: out.logits,
        params=["bert.embeddings.word_embeddings.weight"],
        capture=["bert.encoder.layer.0", "bert.embeddings"],
    )
    e = ex(input_ids=ids, attention_mask=mask, target=1)
    w = e.params["bert.embeddings.word_embeddings.weight"]
    assert w.shape == model.bert.embeddings.word_embeddings.weight.shape
    # rows of tokens absent from the batch get nothing; the rows' total is the token relevance total
    absent = torch.ones(50, dtype=torch.bool)
    absent[ids.flatten()] = False
    assert w[absent].abs().max() == 0
    torch.testing.assert_close(w.sum(), e.inputs["input_ids"].sum(), rtol=1e-5, atol=1e-6)
    assert e.captured["bert.encoder.layer.0"].shape == (2, 7, 16)
    assert e.captured["bert.embeddings"].shape == (2, 7, 16)


def test_unknown_names_are_reported_with_the_available_ones():
    model = _mlp_bias_free()
    x = torch.randn(2, 6, dtype=torch.float64)
    with pytest.raises(dynlrp.DynlrpInputError, match=r"0\.weight"):
        dynlrp.compile(model, x, backend="eager", params=["nope.weight"])
    with pytest.raises(dynlrp.DynlrpInputError, match="2.0"):
        dynlrp.compile(model, x, backend="eager", capture=["9"])
