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
from tests.helpers import tiny_bert, tiny_qwen3_moe


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


def _through_experts(model, path, keep, ids, target, embed: bool = True):
    """Autograd by hand, with gradient passing only the top-k slots routed to experts with ``keep[e] = 1``:
    ``(gradient x input (token ids: summed over the embedding), gradient x output of the layer per sample)``. The experts'
    output is linear in the routing weights ``w``, so ``f(x, w * m) + f(x, w * (1 - m)).detach()`` has the same
    value with the gradient of the kept slots only (a hook on the test's own model, removed afterwards)."""
    busy, outs = [], []

    def hook(module, args, out):
        if busy:
            return None
        x, idx, w = args
        kept = keep[idx].to(w.dtype)
        busy.append(1)
        try:
            y = module(x, idx, w * kept) + module(x, idx, w * (1 - kept)).detach()
        finally:
            busy.pop()
        y.retain_grad()
        outs.append(y)
        return y

    handle = model.get_submodule(path).register_forward_hook(hook)
    try:
        emb = (model.get_input_embeddings()(ids) if embed else ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb).logits if embed else model(emb)
        logits.reshape(len(ids), -1).gather(1, target[:, None]).sum().backward()
    finally:
        handle.remove()
    (y,) = outs
    rel = emb.grad * emb
    return (rel.sum(-1) if embed else rel).detach(), (y.grad * y).reshape(len(ids), -1).sum(1).detach()


class _TopK(nn.Module):
    """Experts written like transformers' ``batched_mm`` ones: each token's top-k slots by their expert's matrix,
    weighted and summed over the slots."""

    def __init__(self, d: int, experts: int):
        super().__init__()
        self.num_experts = experts
        self.weight = nn.Parameter(torch.randn(experts, d, d) / d**0.5)

    def forward(self, x, idx, w):
        y = torch.einsum("nd,nkde->nke", x, self.weight[idx]).relu()
        return (y * w.unsqueeze(-1)).sum(1)


class _Loop(_TopK):
    """The same experts written as a loop over experts (no (tokens, k, hidden) contributions to condition)."""

    def forward(self, x, idx, w):
        return sum((x @ self.weight[e]).relu() * (w * (idx == e)).sum(-1, keepdim=True)
                   for e in range(self.num_experts))


class _MoENet(nn.Module):
    def __init__(self, experts_cls=_TopK, d: int = 6, experts: int = 4):
        super().__init__()
        self.router = nn.Linear(d, experts)
        self.experts = experts_cls(d, experts)
        self.head = nn.Linear(d, 3)

    def forward(self, x):  # (B, T, d): the experts see the batch's tokens as (B*T, d), sample-major
        h = x.reshape(-1, x.shape[-1])
        w, idx = self.router(h).softmax(-1).topk(2, dim=-1)
        return self.head((h + self.experts(h, idx, w)).reshape(x.shape).mean(1))


def test_experts_of_a_hand_written_mixture_as_conditions(tmp_path):
    """The experts of a top-k layer written in plain torch as conditions (float64, ``gradient`` preset): equal to
    autograd with gradient passing only the slots routed to the kept experts; attribute_dataset stores each
    expert's relevance; a layer written as a loop over experts, and a capture of the layer's (tokens, hidden)
    output with several targets, are named with what to do."""
    torch.manual_seed(0)
    model = _MoENet().double().eval()
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    t = torch.tensor([0, 2, 1])
    ex = dynlrp.compile(model, x, rules="gradient", backend="eager")
    full = ex(x, target=t)
    for kept in ([1, 3], [2]):
        keep = torch.zeros(4, dtype=torch.float64)
        keep[kept] = 1
        got = ex(x, target=t, condition={"experts": kept})
        want, at_output = _through_experts(model, "experts", keep, x, t, embed=False)
        torch.testing.assert_close(got.relevance, want, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(full.relevance, want)
    con = ex.concepts(x, target=t, layer="experts")
    _, at_output = _through_experts(model, "experts", torch.ones(4, dtype=torch.float64), x, t, embed=False)
    torch.testing.assert_close(con.relevance.sum(1), at_output, rtol=1e-10, atol=1e-12)
    assert float(ex(x, target=t, condition={"experts": [2]}).conservation.error.max()) < 1e-10
    dynlrp.attribute_dataset(ex, [x[:2], x[2:]], tmp_path / "run", concepts="experts", progress=False)
    torch.testing.assert_close(dynlrp.merge_shards(tmp_path / "run")["concept.experts"],
                               ex.concepts(x, layer="experts").relevance, rtol=1e-12, atol=1e-15)
    cap = dynlrp.compile(model, x, rules="gradient", backend="eager", capture=["experts"])
    assert cap(x, target=t).captured["experts"].shape == (15, 6)
    with pytest.raises(DynlrpInputError, match=r"'experts' has shape \(\d+, 6\), whose first dim merges the batch \(3\)"):
        cap(x, target=torch.stack([t, t], 1))
    loop = dynlrp.compile(_MoENet(_Loop).double().eval(), x, rules="gradient", backend="eager")
    with pytest.raises(DynlrpInputError, match=r"'experts' has 4 experts, but its traced ops do not end in a sum"):
        loop(x, target=t, condition={"experts": [1]})


@pytest.mark.slow  # ~90 s: in CI's slow step (test-slow-ci)
def test_mixture_of_experts_experts_as_conditions():
    """A mixture-of-experts layer (Qwen3-MoE from its default config, sizes shrunk: transformers' default
    grouped_mm experts) as a condition whose features are its experts: with the ``gradient`` preset the
    conditioned relevance equals gradient x input with gradient passing only the top-k slots routed to the kept
    experts (autograd, by hand); one map per expert from concepts() equals single-expert conditions and sums,
    with the share that bypasses the layer, to the unconditional map; each expert's relevance adds up to
    gradient x output at the layer (autograd); several targets per sample equal single calls; the batched_mm
    experts implementation gives the same."""
    model = tiny_qwen3_moe()
    path = "model.layers.0.mlp.experts"
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([4 * 64 + 3, 4 * 64 + 7])  # the last position's logits of tokens 3 and 7
    ex = dynlrp.compile(model, (), example_kwargs={"input_ids": ids}, rules="gradient", backend="eager")
    full = ex(input_ids=ids, target=t)
    keep = torch.tensor([0.0, 1.0, 0.0, 1.0])
    got = ex(input_ids=ids, target=t, condition={path: [1, 3]})
    want, _ = _through_experts(model, path, keep, ids, t)
    scale = float(want.abs().max())
    assert float((got.relevance - want).abs().max()) <= 1e-5 * scale
    # the oracle discriminates: the unconditioned relevance differs from it
    assert float((full.relevance - want).abs().max()) > 1e-3 * scale
    con = ex.concepts(input_ids=ids, target=t, layer=path)
    assert con.heatmaps.shape == (2, 4, 5) and con.relevance.shape == (2, 4) and con.channels == [0, 1, 2, 3]
    around = ex(input_ids=ids, target=t, condition={path: torch.zeros(4)})
    torch.testing.assert_close(con.heatmaps.sum(1) - 3 * around.relevance, full.relevance, rtol=1e-4,
                               atol=1e-5 * scale)
    # what reaches the experts adds up to what reaches the layer's output (gradient x output there)
    _, at_output = _through_experts(model, path, torch.ones(4), ids, t)
    torch.testing.assert_close(con.relevance.sum(1), at_output, rtol=1e-4, atol=1e-6 * float(at_output.abs().max()))
    torch.testing.assert_close(got.conditioned[path], con.relevance)
    for e in (0, 2):
        torch.testing.assert_close(ex(input_ids=ids, target=t, condition={path: [e]}).relevance,
                                   con.heatmaps[:, e])
    both = ex(input_ids=ids, target=torch.stack([t, t - 1], 1), condition={path: [1, 3]})
    assert both.relevance.shape == (2, 2, 5) and both.conditioned[path].shape == (2, 2, 4)
    torch.testing.assert_close(both.relevance[:, 0], got.relevance)
    with pytest.raises(DynlrpInputError, match="features are its 4 experts"):
        ex(input_ids=ids, target=t, condition={path: dynlrp.targets.Features([0], dim=-1)})
    # transformers' other traceable experts implementation (batched_mm: every slot's expert weights gathered,
    # no sort) gives the same per-expert relevance and maps
    batched = type(model)._from_config(model.config, experts_implementation="batched_mm").eval()
    batched.load_state_dict(model.state_dict())
    ex_b = dynlrp.compile(batched, (), example_kwargs={"input_ids": ids}, rules="gradient", backend="eager")
    got_b = ex_b(input_ids=ids, target=t, condition={path: [1, 3]})
    torch.testing.assert_close(got_b.relevance, got.relevance, rtol=1e-4, atol=1e-6 * scale)
    torch.testing.assert_close(got_b.conditioned[path], got.conditioned[path], rtol=1e-4, atol=1e-9)


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
