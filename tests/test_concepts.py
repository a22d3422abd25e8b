"""Concept relevance (CRP): ``condition=`` masks the relevance flowing through a module's output, and
``explainer.concepts`` gives one heatmap per channel in one sweep.

Oracles: a model cut in two at a layer, ``f`` then ``g``, explained by hand (relevance at the layer from ``g``,
masked, then propagated through ``f`` as a seed) equals the conditioned explanation exactly; concept maps over all
channels sum to the unconditional map where the layer is a cut (linearity; elsewhere each map also holds the
relevance that bypasses the layer); the ledger closes (the masked share is absorbed).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynlrp_fx as dynlrp
from dynlrp_fx.errors import DynlrpInputError
from tests.helpers import tiny_bert


def _halves():
    torch.manual_seed(0)
    f = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU()).double().eval()
    g = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 2 * 2, 5)).double().eval()
    return f, g, nn.Sequential(f, g).eval(), torch.randn(3, 3, 8, 8, dtype=torch.float64)


def _by_hand(f, g, x, target, mask):
    """Relevance at f's output from g, masked per channel, then propagated through f as a seed."""
    a = f(x).detach()
    r_a = dynlrp.compile(g, a, rules="epsilon", backend="eager")(a, target=target).relevance
    return r_a, dynlrp.compile(f, x, rules="epsilon", backend="eager")(x, seed=r_a * mask.view(-1, 6, 1, 1)).relevance


def test_condition_equals_masking_the_layer_relevance_by_hand():
    f, g, model, x = _halves()
    ex = dynlrp.compile(model, x, rules="epsilon", backend="eager")
    t = torch.tensor([0, 3, 4])
    got = ex(x, target=t, condition={"0": [2, 5]})
    mask = torch.zeros(6, dtype=torch.float64)
    mask[[2, 5]] = 1
    r_a, want = _by_hand(f, g, x, t, mask)
    torch.testing.assert_close(got.relevance, want, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got.conditioned["0"], r_a.sum((2, 3)), rtol=1e-12, atol=1e-15)
    assert float(got.conservation.error.max()) < 1e-10  # what the mask removed is absorbed
    # a per-sample float mask weights the channels
    w = torch.rand(3, 6, dtype=torch.float64)
    got_w = ex(x, target=t, condition={"0": w})
    a = f(x).detach()
    r_a = dynlrp.compile(g, a, rules="epsilon", backend="eager")(a, target=t).relevance
    want_w = dynlrp.compile(f, x, rules="epsilon", backend="eager")(x, seed=r_a * w.view(3, 6, 1, 1)).relevance
    torch.testing.assert_close(got_w.relevance, want_w, rtol=1e-12, atol=1e-15)
    # the model is the same afterwards, and an unconditioned call is unchanged
    torch.testing.assert_close(ex(x, target=t).relevance, dynlrp.compile(model, x, rules="epsilon",
                                                                          backend="eager")(x, target=t).relevance)


def test_concepts_one_heatmap_per_channel_summing_to_the_explanation():
    f, g, model, x = _halves()
    ex = dynlrp.compile(model, x, rules="epsilon", backend="eager")
    t = torch.tensor([1, 1, 2])
    full = ex(x, target=t)
    con = ex.concepts(x, target=t, layer="0")
    assert con.heatmaps.shape == (3, 6, 3, 8, 8) and con.relevance.shape == (3, 6) and con.channels == list(range(6))
    torch.testing.assert_close(con.heatmaps.sum(1), full.relevance, rtol=1e-10, atol=1e-14)
    r_a, _ = _by_hand(f, g, x, t, torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(con.relevance, r_a.sum((2, 3)), rtol=1e-12, atol=1e-15)
    for c in (0, 4):
        one = ex(x, target=t, condition={"0": [c]})
        torch.testing.assert_close(con.heatmaps[:, c], one.relevance, rtol=1e-10, atol=1e-14)
    some = ex.concepts(x, target=t, layer="0", channels=[5, 1])
    torch.testing.assert_close(some.heatmaps, con.heatmaps[:, [5, 1]], rtol=1e-10, atol=1e-14)


@pytest.mark.slow
def test_attention_head_features_of_a_transformer():
    """A head's output features (the last dim of BERT's self-attention output, head h = features h*D..(h+1)*D)
    as conditions: relevance is linear in the mask, so the heads' maps add up to the unconditional map plus the
    share that bypasses the attention (a zero mask's map), and concepts() over that dim has one map per feature."""
    torch.manual_seed(0)
    model = tiny_bert().double()
    ids = torch.randint(0, 100, (2, 7))
    ex = dynlrp.compile(model, (ids,), backend="eager")
    layer = "bert.encoder.layer.0.attention.self"
    full = ex(ids, target=1)
    heads = []
    for h in range(2):
        mask = torch.zeros(32, dtype=torch.float64)
        mask[h * 16 : (h + 1) * 16] = 1
        heads.append(ex(ids, target=1, condition={layer: mask}))
    # the residual stream bypasses the attention: a zero mask leaves the relevance that flows around it, which
    # every head's map contains too (the layer is not a cut), so the heads sum to the whole plus one bypass share
    around = ex(ids, target=1, condition={layer: torch.zeros(32, dtype=torch.float64)})
    assert around.relevance.abs().max() > 0 and not torch.allclose(around.relevance, full.relevance)
    torch.testing.assert_close(heads[0].relevance + heads[1].relevance - around.relevance, full.relevance,
                               rtol=1e-10, atol=1e-12)
    con = ex.concepts(ids, target=1, layer=layer, dim=-1)
    assert con.heatmaps.shape == (2, 32, 7)


def test_bad_conditions_say_what_to_do():
    _, _, model, x = _halves()
    ex = dynlrp.compile(model, x, rules="epsilon", backend="eager")
    with pytest.raises(DynlrpInputError, match="no traced operation belongs to module 'nope'"):
        ex(x, condition={"nope": [0]})
    with pytest.raises(DynlrpInputError, match="out of range"):
        ex(x, condition={"0": [6]})
    with pytest.raises(DynlrpInputError, match="expected \\(6,\\) or \\(3, 6\\)"):
        ex(x, condition={"0": torch.ones(5)})
    with pytest.raises(DynlrpInputError, match="dict module path"):
        ex(x, condition=[0])
    with pytest.raises(DynlrpInputError, match="channels"):
        ex.concepts(x, layer="0", channels=[9])


def test_dataset_concepts_rank_the_most_relevant_samples(tmp_path):
    """attribute_dataset(concepts=[layer]) stores each sample's relevance per channel of the layer (equal to
    concepts()'s channel relevance) without changing the explanation; top_samples ranks samples per channel."""
    _, _, model, _ = _halves()
    torch.manual_seed(3)
    data = torch.randn(10, 3, 8, 8, dtype=torch.float64)
    loader = [data[i : i + 4] for i in range(0, 10, 4)]
    ex = dynlrp.compile(model, data[:2], rules="epsilon", backend="eager")
    dynlrp.attribute_dataset(ex, loader, tmp_path / "run", concepts="0", progress=False, shard_size=2)
    merged = dynlrp.merge_shards(tmp_path / "run")
    assert merged["concept.0"].shape == (10, 6)
    plain = ex(data)
    name = next(iter(plain.inputs))
    torch.testing.assert_close(merged[f"relevance.{name}"], plain.relevance, rtol=1e-12, atol=1e-15)
    want = ex.concepts(data, layer="0").relevance
    torch.testing.assert_close(merged["concept.0"], want, rtol=1e-12, atol=1e-15)
    idx, val = dynlrp.top_samples(tmp_path / "run", "0", n=3)
    assert idx.shape == (3, 6)
    for c in range(6):
        order = torch.argsort(want[:, c], descending=True)[:3]
        assert idx[:, c].tolist() == order.tolist()
        torch.testing.assert_close(val[:, c], want[order, c])
    with pytest.raises(KeyError, match="concepts="):
        dynlrp.top_samples(merged, "2")
